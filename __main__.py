"""Chroma behind an authenticating proxy: reads the stack config, builds one target, exports."""

import pulumi

from components.azure_vm import ChromaAzureVm
from components.local_docker import ChromaLocalDocker
from components.settings import load_stack_settings

settings = load_stack_settings()
target = ChromaAzureVm if settings.target == "azure" else ChromaLocalDocker
chroma = target("chroma", settings)
for name, value in chroma.exports().items():
    pulumi.export(name, value)
