"""`DataDiskBackup`: Azure Backup for disks (operational tier snapshots) of Chroma's data disk.

The vault's managed identity reads the disk (Disk Backup Reader) and writes incremental snapshots
into the data disk's resource group (Disk Snapshot Contributor), so snapshots, vault and disk live
together and outlive the VM. A snapshot is crash-consistent; the guard's repair at first start
(scripts/chroma_data.py) makes it whole, because Chroma's write log is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_azure_native.authorization as authorization
import pulumi_azure_native.dataprotection as dataprotection

DISK_DATASOURCE_TYPE = "Microsoft.Compute/disks"
OPERATIONAL_STORE = "OperationalStore"
# Built-in role definition ids (the same in every subscription).
DISK_BACKUP_READER = "3e5e47e6-65f7-47ef-90b5-e5dd4d455f24"
DISK_SNAPSHOT_CONTRIBUTOR = "7efff54f-a5b4-42b5-a1c5-5411624893ce"
# Azure Backup for disks takes hourly backups every 1, 2, 4, 6, 8 or 12 hours, or daily.
BACKUP_INTERVALS_HOURS = (1, 2, 4, 6, 8, 12, 24)
# Of a disk's 450 retained snapshots, 420 are for scheduled backups (the rest for on-demand ones).
MAX_SCHEDULED_SNAPSHOTS = 420
# The first backup's start; later ones repeat every interval from here (ISO 8601 repeating interval).
SCHEDULE_START = "2026-01-01T02:00:00+00:00"


def repeating_interval(interval_hours: int) -> str:
    """The policy's schedule: R/<start>/PT<n>H, or P1D for daily."""
    period = "P1D" if interval_hours == 24 else f"PT{interval_hours}H"
    return f"R/{SCHEDULE_START}/{period}"


def retained_snapshots(interval_hours: int, retention_days: int) -> int:
    """How many snapshots the policy keeps at once."""
    return retention_days * 24 // interval_hours


@dataclass(frozen=True)
class DataDiskBackupArgs:
    """The disk to back up, where its snapshots go, and the schedule."""

    disk_id: pulumi.Input[str]
    disk_name: pulumi.Input[str]
    resource_group_name: pulumi.Input[str]
    resource_group_id: pulumi.Input[str]
    location: pulumi.Input[str]
    interval_hours: int
    retention_days: int
    protect: bool
    tags: dict[str, str]


class DataDiskBackup(pulumi.ComponentResource):
    """A backup vault, a disk policy, the vault's two role assignments, and the disk's backup instance."""

    vault_id: pulumi.Output[str]
    policy_id: pulumi.Output[str]
    instance_id: pulumi.Output[str]

    def __init__(self, name: str, args: DataDiskBackupArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("chroma-infra:azure:DataDiskBackup", name, None, opts)
        # Deleting the vault would delete the backups: it shares the data disk's protection.
        keep = pulumi.ResourceOptions(parent=self, protect=args.protect)
        vault = dataprotection.BackupVault(
            f"{name}-vault",
            resource_group_name=args.resource_group_name,
            location=args.location,
            identity=dataprotection.DppIdentityDetailsArgs(type="SystemAssigned"),
            properties=dataprotection.BackupVaultArgs(
                storage_settings=[
                    dataprotection.StorageSettingArgs(datastore_type="VaultStore", type="LocallyRedundant")
                ]
            ),
            tags=args.tags,
            opts=keep,
        )
        policy = dataprotection.BackupPolicy(
            f"{name}-policy",
            resource_group_name=args.resource_group_name,
            vault_name=vault.name,
            properties=self._policy(args.interval_hours, args.retention_days),
            opts=pulumi.ResourceOptions(parent=self),
        )
        principal_id = vault.identity.apply(lambda identity: identity.principal_id if identity else None)
        subscription_id = authorization.get_client_config_output().subscription_id
        reader = self._role(f"{name}-disk-reader", DISK_BACKUP_READER, args.disk_id, principal_id, subscription_id)
        snapshots = self._role(
            f"{name}-snapshot-contributor",
            DISK_SNAPSHOT_CONTRIBUTOR,
            args.resource_group_id,
            principal_id,
            subscription_id,
        )
        instance = dataprotection.BackupInstance(
            f"{name}-instance",
            resource_group_name=args.resource_group_name,
            vault_name=vault.name,
            properties=dataprotection.BackupInstanceArgs(
                object_type="BackupInstance",
                friendly_name=args.disk_name,
                data_source_info=dataprotection.DatasourceArgs(
                    object_type="Datasource",
                    resource_id=args.disk_id,
                    resource_uri=args.disk_id,
                    resource_name=args.disk_name,
                    resource_type=DISK_DATASOURCE_TYPE,
                    datasource_type=DISK_DATASOURCE_TYPE,
                    resource_location=args.location,
                ),
                policy_info=dataprotection.PolicyInfoArgs(
                    policy_id=policy.id,
                    policy_parameters=dataprotection.PolicyParametersArgs(
                        data_store_parameters_list=[
                            dataprotection.AzureOperationalStoreParametersArgs(
                                object_type="AzureOperationalStoreParameters",
                                data_store_type=OPERATIONAL_STORE,
                                resource_group_id=args.resource_group_id,
                            )
                        ]
                    ),
                ),
            ),
            tags=args.tags,
            # Azure validates the vault's permissions when the instance is created.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[reader, snapshots]),
        )
        self.vault_id = vault.id
        self.policy_id = policy.id
        self.instance_id = instance.id
        self.register_outputs({"vaultId": vault.id, "policyId": policy.id, "instanceId": instance.id})

    @staticmethod
    def _policy(interval_hours: int, retention_days: int) -> dataprotection.BackupPolicyArgs:
        operational = dataprotection.DataStoreInfoBaseArgs(
            data_store_type=OPERATIONAL_STORE, object_type="DataStoreInfoBase"
        )
        return dataprotection.BackupPolicyArgs(
            object_type="BackupPolicy",
            datasource_types=[DISK_DATASOURCE_TYPE],
            policy_rules=[
                dataprotection.AzureBackupRuleArgs(
                    name="BackupDaily" if interval_hours == 24 else "BackupHourly",
                    object_type="AzureBackupRule",
                    backup_parameters=dataprotection.AzureBackupParamsArgs(
                        backup_type="Incremental", object_type="AzureBackupParams"
                    ),
                    data_store=operational,
                    trigger=dataprotection.ScheduleBasedTriggerContextArgs(
                        object_type="ScheduleBasedTriggerContext",
                        schedule=dataprotection.BackupScheduleArgs(
                            repeating_time_intervals=[repeating_interval(interval_hours)], time_zone="UTC"
                        ),
                        tagging_criteria=[
                            dataprotection.TaggingCriteriaArgs(
                                is_default=True,
                                tagging_priority=99,
                                tag_info=dataprotection.RetentionTagArgs(tag_name="Default"),
                            )
                        ],
                    ),
                ),
                dataprotection.AzureRetentionRuleArgs(
                    name="Default",
                    object_type="AzureRetentionRule",
                    is_default=True,
                    lifecycles=[
                        dataprotection.SourceLifeCycleArgs(
                            source_data_store=operational,
                            delete_after=dataprotection.AbsoluteDeleteOptionArgs(
                                duration=f"P{retention_days}D", object_type="AbsoluteDeleteOption"
                            ),
                        )
                    ],
                ),
            ],
        )

    def _role(
        self,
        name: str,
        role_id: str,
        scope: pulumi.Input[str],
        principal_id: pulumi.Output[str],
        subscription_id: pulumi.Output[str],
    ) -> authorization.RoleAssignment:
        return authorization.RoleAssignment(
            name,
            principal_id=principal_id,
            principal_type="ServicePrincipal",
            role_definition_id=pulumi.Output.concat(
                "/subscriptions/", subscription_id, "/providers/Microsoft.Authorization/roleDefinitions/", role_id
            ),
            scope=scope,
            opts=pulumi.ResourceOptions(parent=self),
        )
