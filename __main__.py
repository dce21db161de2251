"""Chroma behind an authenticating TLS proxy: reads the stack config, builds one target, exports."""

import pulumi

from components.azure_vm import ChromaAzureVm
from components.settings import load_stack_settings

settings = load_stack_settings()

chroma = ChromaAzureVm("chroma", settings)
pulumi.export("endpoint", chroma.endpoint)
pulumi.export("heartbeatUrl", chroma.heartbeat_url)
pulumi.export("fqdn", chroma.fqdn)
pulumi.export("publicIp", chroma.public_ip)
pulumi.export("authHeader", settings.auth_header)
pulumi.export("authToken", chroma.auth_token)
pulumi.export("chromaVersion", settings.chroma_version)
pulumi.export("dataDiskId", chroma.data_disk_id)
if chroma.ssh_command is not None:
    pulumi.export("sshCommand", chroma.ssh_command)
if chroma.ssh_private_key is not None:
    pulumi.export("sshPrivateKey", chroma.ssh_private_key)
