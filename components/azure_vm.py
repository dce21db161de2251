"""`ChromaAzureVm`: Chroma on an Ubuntu 24.04 VM behind Caddy, with its data on a managed disk.

The data disk is a separate resource in its own resource group, attached at LUN 0 with delete
option Detach and protected by default, so replacing or deleting the VM never deletes the data.
Azure Backup for disks snapshots it (components/backup.py), and `dataDiskSourceId` restores one.
Only 443 (from allowedCidrs), 80 (ACME challenges and the redirect) and, when asked, 22 are open;
Chroma's port is published on no host port at all. With a `zone`, the VM is pinned to it while the
disk (ZRS) and the public IP span all zones, so a change of zone replaces the VM and nothing else.

The VM's custom data is only the bootstrap (components/cloud_config.py). What changes with the
settings (token, header, acmeEmail, chromaVersion, OTel) reaches the running VM through a managed
run command (components/runtime_config.py), which Azure re-runs whenever its input changes: a
token rotation replaces the file the proxy reads the token from, not the VM.
"""

from __future__ import annotations

import base64
import re

import pulumi
import pulumi_azure_native.compute as compute
import pulumi_azure_native.network as network
import pulumi_azure_native.resources as resources
import pulumi_random as random

from components import credentials, runtime, runtime_config, sizing, zones
from components.backup import DataDiskBackup, DataDiskBackupArgs
from components.cloud_config import MAX_CUSTOM_DATA_BYTES, render_cloud_config, render_compose
from components.runtime import HEARTBEAT_PATH
from components.settings import Settings

DATA_DISK_LUN = 0
OS_DISK_SIZE_GB = 30
VNET_PREFIX = "10.42.0.0/16"
SUBNET_PREFIX = "10.42.1.0/24"
UBUNTU_2404 = compute.ImageReferenceArgs(
    publisher="Canonical", offer="ubuntu-24_04-lts", sku="server", version="latest"
)
_LABEL_SUFFIX_LENGTH = 6
_MAX_LABEL_LENGTH = 63


def default_dns_label_prefix(project: str, stack: str) -> str:
    """project-stack, lowercased and cut to what leaves room for '-' and the random suffix."""
    prefix = re.sub(r"[^a-z0-9-]+", "-", f"{project}-{stack}".lower()).strip("-")
    prefix = prefix[: _MAX_LABEL_LENGTH - _LABEL_SUFFIX_LENGTH - 1].rstrip("-")
    return prefix if prefix[:1].isalpha() else f"c-{prefix}"


class ChromaAzureVm(pulumi.ComponentResource):
    """An Azure VM running Chroma behind an authenticating HTTPS proxy, with a persistent data disk."""

    endpoint: pulumi.Output[str]
    heartbeat_url: pulumi.Output[str]
    fqdn: pulumi.Output[str]
    public_ip: pulumi.Output[str]
    auth_token: pulumi.Output[str]
    data_disk_id: pulumi.Output[str]
    ssh_command: pulumi.Output[str] | None
    ssh_private_key: pulumi.Output[str] | None

    def __init__(self, name: str, args: Settings, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("chroma-infra:azure:ChromaAzureVm", name, None, opts)
        self._name = name
        self._settings = args
        child = pulumi.ResourceOptions(parent=self)
        tags = {"project": pulumi.get_project(), "stack": pulumi.get_stack()}

        group = resources.ResourceGroup(f"{name}-rg", location=args.location, tags=tags, opts=child)
        nsg = network.NetworkSecurityGroup(
            f"{name}-nsg",
            resource_group_name=group.name,
            security_rules=self._security_rules(),
            tags=tags,
            opts=child,
        )
        vnet = network.VirtualNetwork(
            f"{name}-vnet",
            resource_group_name=group.name,
            address_space=network.AddressSpaceArgs(address_prefixes=[VNET_PREFIX]),
            tags=tags,
            opts=child,
        )
        subnet = network.Subnet(
            f"{name}-subnet",
            resource_group_name=group.name,
            virtual_network_name=vnet.name,
            address_prefix=SUBNET_PREFIX,
            network_security_group=network.NetworkSecurityGroupArgs(id=nsg.id),
            opts=child,
        )
        public_ip = network.PublicIPAddress(
            f"{name}-ip",
            resource_group_name=group.name,
            sku=network.PublicIPAddressSkuArgs(name=network.PublicIPAddressSkuName.STANDARD),
            public_ip_allocation_method=network.IPAllocationMethod.STATIC,
            dns_settings=network.PublicIPAddressDnsSettingsArgs(domain_name_label=self._dns_label()),
            # Zone-redundant, so the address and the DNS name outlive any one zone and the VM in it.
            zones=list(zones.ZONES) if args.zone else None,
            tags=tags,
            opts=child,
        )
        nic = network.NetworkInterface(
            f"{name}-nic",
            resource_group_name=group.name,
            ip_configurations=[
                network.NetworkInterfaceIPConfigurationArgs(
                    name="primary",
                    subnet=network.SubnetArgs(id=subnet.id),
                    private_ip_allocation_method=network.IPAllocationMethod.DYNAMIC,
                    public_ip_address=network.PublicIPAddressArgs(id=public_ip.id),
                )
            ],
            tags=tags,
            opts=child,
        )
        # Deleting a resource group deletes whatever is in it, protected in Pulumi or not, so
        # the data disk lives in a group of its own that shares the disk's protection.
        keep_data = pulumi.ResourceOptions(parent=self, protect=args.protect_data_disk)
        data_group = resources.ResourceGroup(f"{name}-data-rg", location=args.location, tags=tags, opts=keep_data)
        # No zones on the disk: a ZRS disk is regional and attaches to a VM in any zone.
        data_disk = compute.Disk(
            f"{name}-data",
            resource_group_name=data_group.name,
            sku=compute.DiskSkuArgs(name=args.data_disk_sku),
            disk_size_gb=args.data_disk_size_gb,
            creation_data=self._data_disk_source(),
            tags=tags,
            opts=keep_data,
        )
        self.backup = (
            DataDiskBackup(
                f"{name}-backup",
                DataDiskBackupArgs(
                    disk_id=data_disk.id,
                    disk_name=data_disk.name,
                    resource_group_name=data_group.name,
                    resource_group_id=data_group.id,
                    location=args.location,
                    interval_hours=args.backup_interval_hours,
                    retention_days=args.backup_retention_days,
                    protect=args.protect_data_disk,
                    tags=tags,
                ),
                opts=child,
            )
            if args.backup_enabled
            else None
        )

        fqdn = public_ip.dns_settings.apply(lambda dns: dns.fqdn)
        self.auth_token = credentials.auth_token(name, args, self)
        public_key, self.ssh_private_key = credentials.ssh_key(name, args, self)

        vm = compute.VirtualMachine(
            f"{name}-vm",
            resource_group_name=group.name,
            hardware_profile=compute.HardwareProfileArgs(vm_size=args.vm_size),
            os_profile=compute.OSProfileArgs(
                computer_name="chroma",
                admin_username=args.admin_username,
                custom_data=self._custom_data(),
                linux_configuration=compute.LinuxConfigurationArgs(
                    disable_password_authentication=True,
                    ssh=compute.SshConfigurationArgs(
                        public_keys=[
                            compute.SshPublicKeyArgs(
                                path=f"/home/{args.admin_username}/.ssh/authorized_keys",
                                key_data=public_key,
                            )
                        ]
                    ),
                ),
            ),
            storage_profile=compute.StorageProfileArgs(
                image_reference=UBUNTU_2404,
                disk_controller_type=compute.DiskControllerTypes.NV_ME if sizing.is_nvme_only(args.vm_size) else None,
                os_disk=compute.OSDiskArgs(
                    create_option=compute.DiskCreateOptionTypes.FROM_IMAGE,
                    delete_option=compute.DiskDeleteOptionTypes.DELETE,
                    caching=compute.CachingTypes.READ_WRITE,
                    disk_size_gb=OS_DISK_SIZE_GB,
                    managed_disk=compute.ManagedDiskParametersArgs(
                        storage_account_type="Premium_LRS"
                        if sizing.supports_premium_storage(args.vm_size)
                        else "StandardSSD_LRS"
                    ),
                ),
                data_disks=[
                    compute.DataDiskArgs(
                        lun=DATA_DISK_LUN,
                        create_option=compute.DiskCreateOptionTypes.ATTACH,
                        managed_disk=compute.ManagedDiskParametersArgs(id=data_disk.id),
                        delete_option=compute.DiskDeleteOptionTypes.DETACH,
                    )
                ],
            ),
            network_profile=compute.NetworkProfileArgs(
                network_interfaces=[compute.NetworkInterfaceReferenceArgs(id=nic.id, primary=True)]
            ),
            diagnostics_profile=compute.DiagnosticsProfileArgs(
                boot_diagnostics=compute.BootDiagnosticsArgs(enabled=True)
            ),
            zones=[args.zone] if args.zone else None,
            tags=tags,
            opts=pulumi.ResourceOptions(
                parent=self,
                # Azure can change neither custom data nor the zone of a VM in place; the data
                # disk and NIC can only attach to one VM, so the old VM goes first.
                replace_on_changes=["osProfile.customData", "zones"],
                delete_before_replace=True,
            ),
        )

        self._runtime_config(group, vm, fqdn, tags)

        self.fqdn = fqdn
        self.public_ip = public_ip.ip_address.apply(lambda address: address or "")
        self.endpoint = pulumi.Output.concat("https://", fqdn)
        self.heartbeat_url = pulumi.Output.concat("https://", fqdn, HEARTBEAT_PATH)
        self.data_disk_id = data_disk.id
        self.vm_id = vm.id
        self.ssh_command = self._ssh_command(fqdn) if args.ssh_enabled else None
        self.register_outputs({**self.exports(), "vmId": self.vm_id})

    def exports(self) -> dict[str, pulumi.Input[str]]:
        """Stack outputs: what a client (and the smoke test) needs to connect."""
        outputs: dict[str, pulumi.Input[str]] = {
            "endpoint": self.endpoint,
            "heartbeatUrl": self.heartbeat_url,
            "fqdn": self.fqdn,
            "publicIp": self.public_ip,
            "authHeader": self._settings.auth_header,
            "authToken": self.auth_token,
            "chromaVersion": self._settings.chroma_version,
            "dataDiskId": self.data_disk_id,
        }
        if self.backup is not None:
            outputs["backupVaultId"] = self.backup.vault_id
        if self.ssh_command is not None:
            outputs["sshCommand"] = self.ssh_command
        if self.ssh_private_key is not None:
            outputs["sshPrivateKey"] = self.ssh_private_key
        return outputs

    def _data_disk_source(self) -> compute.CreationDataArgs:
        # A restore: the new disk is a copy of a snapshot or disk (e.g. one Azure Backup restored).
        # Chroma's guard repairs it at first start, since a snapshot is only crash-consistent.
        if self._settings.data_disk_source_id:
            return compute.CreationDataArgs(
                create_option=compute.DiskCreateOption.COPY, source_resource_id=self._settings.data_disk_source_id
            )
        return compute.CreationDataArgs(create_option=compute.DiskCreateOption.EMPTY)

    def _security_rules(self) -> list[network.SecurityRuleArgs]:
        def allow(rule_name: str, priority: int, port: str, sources: list[str], why: str) -> network.SecurityRuleArgs:
            return network.SecurityRuleArgs(
                name=rule_name,
                description=why,
                priority=priority,
                direction=network.SecurityRuleDirection.INBOUND,
                access=network.SecurityRuleAccess.ALLOW,
                protocol=network.SecurityRuleProtocol.TCP,
                source_address_prefixes=sources,
                source_port_range="*",
                destination_address_prefix="*",
                destination_port_range=port,
            )

        settings = self._settings
        rules = [
            allow("allow-https", 100, "443", list(settings.allowed_cidrs), "Chroma clients, through the proxy"),
            allow("allow-http", 110, "80", ["0.0.0.0/0"], "ACME HTTP-01 challenges and the redirect to HTTPS"),
        ]
        if settings.ssh_enabled:
            rules.append(allow("allow-ssh", 120, "22", list(settings.ssh_allowed_cidrs), "SSH from sshAllowedCidrs"))
        return rules

    def _dns_label(self) -> pulumi.Input[str]:
        if self._settings.dns_label:
            return self._settings.dns_label
        suffix = random.RandomString(
            f"{self._name}-dns-suffix",
            length=_LABEL_SUFFIX_LENGTH,
            upper=False,
            special=False,
            opts=pulumi.ResourceOptions(parent=self),
        )
        prefix = default_dns_label_prefix(pulumi.get_project(), pulumi.get_stack())
        return pulumi.Output.concat(prefix, "-", suffix.result)

    def _custom_data(self) -> str:
        # The same bytes for any token, version, header, OTel or email: none of them replaces the VM.
        cloud_config = render_cloud_config()
        encoded = base64.b64encode(cloud_config.encode("utf-8")).decode("ascii")
        if len(encoded) > MAX_CUSTOM_DATA_BYTES:
            raise pulumi.RunError(
                f"The VM's cloud-config is {len(encoded)} bytes in base64; Azure accepts {MAX_CUSTOM_DATA_BYTES}."
            )
        return encoded

    def _runtime_config(
        self,
        group: resources.ResourceGroup,
        vm: compute.VirtualMachine,
        fqdn: pulumi.Output[str],
        tags: dict[str, str],
    ) -> compute.VirtualMachineRunCommandByVirtualMachine:
        """The run command that delivers the proxy config, the token and the compose file to the running VM."""
        settings = self._settings

        def pairs(parameters: dict[str, str]) -> list[dict[str, str]]:
            return [{"name": name, "value": value} for name, value in parameters.items()]

        # Rendered apart, so that nothing secret flows into the plain parameters (an output derived
        # from a secret is secret as a whole): the proxy config from the FQDN, the secrets from the token.
        caddyfile = fqdn.apply(
            lambda name: runtime.render_caddyfile(
                runtime_config.vm_site(name), settings.auth_header, settings.acme_email
            )
        )
        compose = render_compose(settings.chroma_version, settings.otel)
        return compute.VirtualMachineRunCommandByVirtualMachine(
            f"{self._name}-runtime",
            resource_group_name=group.name,
            vm_name=vm.name,
            run_command_name=runtime_config.RUN_COMMAND_NAME,
            location=settings.location,
            source=compute.VirtualMachineRunCommandScriptSourceArgs(script=runtime_config.RUN_COMMAND_SCRIPT),
            # In the clear, so a plan shows a version, header or email change; the token and the
            # compose file (OTel headers) only as secrets.
            parameters=caddyfile.apply(
                lambda text: pairs(runtime_config.plain_parameters(text, settings.chroma_version))
            ),
            protected_parameters=pulumi.Output.secret(
                self.auth_token.apply(lambda token: pairs(runtime_config.protected_parameters(token, compose)))
            ),
            timeout_in_seconds=runtime_config.RUN_COMMAND_TIMEOUT_SECONDS,
            # A failed apply (for example a version that never became healthy and was rolled back)
            # fails `pulumi up`, instead of passing with the old version still running.
            treat_failure_as_deployment_failure=True,
            async_execution=False,
            tags=tags,
            opts=pulumi.ResourceOptions(
                parent=self,
                # A run command lives inside its VM: a new VM needs it created (and run) again.
                replace_with=[vm],
            ),
        )

    def _ssh_command(self, fqdn: pulumi.Output[str]) -> pulumi.Output[str]:
        user = self._settings.admin_username
        if self.ssh_private_key is None:
            return pulumi.Output.concat("ssh ", user, "@", fqdn)
        key_file = f"{pulumi.get_stack()}-ssh.key"
        # umask first: the key file is never readable by others, not even for a moment.
        fetch_key = f"(umask 077 && pulumi stack output sshPrivateKey --show-secrets > {key_file})"
        return pulumi.Output.concat(fetch_key, f" && ssh -i {key_file} ", user, "@", fqdn)
