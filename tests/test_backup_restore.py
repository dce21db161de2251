"""Backups of the data disk (Azure Backup for disks) and restores from them, under mocks (preview=False)."""

import pytest
from conftest import MOCK_PRINCIPAL_ID, MOCK_SUBSCRIPTION_ID, plain, run_program

from components.backup import DISK_BACKUP_READER, DISK_SNAPSHOT_CONTRIBUTOR
from components.settings import SettingsError

VAULT = "azure-native:dataprotection:BackupVault"
POLICY = "azure-native:dataprotection:BackupPolicy"
INSTANCE = "azure-native:dataprotection:BackupInstance"
ROLE = "azure-native:authorization:RoleAssignment"
DISK = "azure-native:compute:Disk"
GROUP = "azure-native:resources:ResourceGroup"
SNAPSHOT_ID = (
    "/subscriptions/01234567-89ab-cdef-0123-456789abcdef/resourceGroups/chroma-restore/providers/"
    "Microsoft.Compute/snapshots/chroma-data-2026-11-26"
)


@pytest.fixture(scope="module")
def backup_run():
    return run_program("dev", {"backupIntervalHours": 6, "backupRetentionDays": 30})


def data_group_id(run) -> str:
    (group,) = [resource for resource in run.of_type(GROUP) if resource.name.endswith("-data-rg")]
    return f"/mock/{group.name}"


def test_backups_are_on_by_default(dev_run):
    assert len(dev_run.of_type(VAULT)) == 1, "backupEnabled defaults to true"
    assert "backupVaultId" in dev_run.outputs
    policy = plain(dev_run.one(POLICY).inputs)["properties"]
    assert policy["policyRules"][0]["trigger"]["schedule"]["repeatingTimeIntervals"][0].endswith("/PT4H")
    assert policy["policyRules"][1]["lifecycles"][0]["deleteAfter"]["duration"] == "P7D"


def test_the_policy_takes_the_configured_schedule_into_the_operational_tier(backup_run):
    policy = plain(backup_run.one(POLICY).inputs)["properties"]
    assert policy["datasourceTypes"] == ["Microsoft.Compute/disks"]
    backup_rule, retention_rule = policy["policyRules"]
    assert backup_rule["objectType"] == "AzureBackupRule"
    assert backup_rule["backupParameters"]["backupType"] == "Incremental"
    assert backup_rule["dataStore"]["dataStoreType"] == "OperationalStore"
    (interval,) = backup_rule["trigger"]["schedule"]["repeatingTimeIntervals"]
    assert interval.startswith("R/"), interval
    assert interval.endswith("/PT6H"), interval
    assert retention_rule["objectType"] == "AzureRetentionRule"
    assert retention_rule["isDefault"] is True
    (lifecycle,) = retention_rule["lifecycles"]
    assert lifecycle["deleteAfter"]["duration"] == "P30D"
    assert lifecycle["sourceDataStore"]["dataStoreType"] == "OperationalStore"


def test_the_vault_has_its_own_identity_and_is_protected_with_the_data(backup_run):
    vault = backup_run.one(VAULT)
    assert plain(vault.inputs)["identity"]["type"] == "SystemAssigned"
    assert vault.protect, "deleting the vault deletes the backups: it shares the data disk's protection"
    assert vault.inputs["resourceGroupName"] == backup_run.one(DISK).inputs["resourceGroupName"], (
        "vault and snapshots live beside the disk, not with the VM that gets replaced"
    )


def test_the_vault_can_read_the_disk_and_write_snapshots_into_the_data_group(backup_run):
    roles = {role.inputs["roleDefinitionId"].rsplit("/", 1)[-1]: role.inputs for role in backup_run.of_type(ROLE)}
    assert set(roles) == {DISK_BACKUP_READER, DISK_SNAPSHOT_CONTRIBUTOR}
    for role in roles.values():
        assert role["principalId"] == MOCK_PRINCIPAL_ID, "granted to the vault's managed identity"
        assert role["principalType"] == "ServicePrincipal"
        assert role["roleDefinitionId"].startswith(f"/subscriptions/{MOCK_SUBSCRIPTION_ID}/providers/")
    assert roles[DISK_BACKUP_READER]["scope"] == f"/mock/{backup_run.one(DISK).name}"
    assert roles[DISK_SNAPSHOT_CONTRIBUTOR]["scope"] == data_group_id(backup_run)


def test_the_instance_backs_up_the_data_disk_with_the_policy(backup_run):
    instance = plain(backup_run.one(INSTANCE).inputs)["properties"]
    disk_id = f"/mock/{backup_run.one(DISK).name}"
    assert instance["objectType"] == "BackupInstance"
    source = instance["dataSourceInfo"]
    assert disk_id in (source.get("resourceID"), source.get("resourceId"))
    assert source["datasourceType"] == "Microsoft.Compute/disks"
    assert instance["policyInfo"]["policyId"] == f"/mock/{backup_run.one(POLICY).name}"
    (store,) = instance["policyInfo"]["policyParameters"]["dataStoreParametersList"]
    assert store["objectType"] == "AzureOperationalStoreParameters"
    assert store["resourceGroupId"] == data_group_id(backup_run)


def test_backups_can_be_turned_off():
    run = run_program("dev", {"backupEnabled": False})
    for type_token in (VAULT, POLICY, INSTANCE, ROLE):
        assert not run.of_type(type_token), type_token
    assert "backupVaultId" not in run.outputs


def test_a_new_data_disk_is_empty_and_a_restore_copies_the_source(dev_run):
    assert plain(dev_run.one(DISK).inputs)["creationData"] == {"createOption": "Empty"}
    restored = run_program("dev", {"dataDiskSourceId": SNAPSHOT_ID})
    creation = plain(restored.one(DISK).inputs)["creationData"]
    assert creation == {"createOption": "Copy", "sourceResourceId": SNAPSHOT_ID}
    assert restored.one(DISK).protect, "a restored disk is protected like any data disk"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"dataDiskSourceId": "chroma-data-2026-11-26"}, "chroma-infra:dataDiskSourceId = 'chroma-data-2026-11-26'"),
        (
            {"dataDiskSourceId": SNAPSHOT_ID.replace("Microsoft.Compute/snapshots", "Microsoft.Storage/accounts")},
            "not the resource id of a managed disk or a disk snapshot",
        ),
        ({"backupIntervalHours": 5}, "chroma-infra:backupIntervalHours = 5: is not an interval"),
        ({"backupIntervalHours": 1, "backupRetentionDays": 30}, "keeps 720 snapshots"),
        ({"backupRetentionDays": 0}, "chroma-infra:backupRetentionDays = '0'"),
    ],
)
def test_bad_backup_or_restore_config_fails_before_any_resource(overrides, expected):
    with pytest.raises(SettingsError, match="nothing was deployed") as raised:
        run_program("dev", overrides)
    assert expected in str(raised.value)
