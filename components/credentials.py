"""The client token and the SSH key: taken from config when given, generated once otherwise.

Generated values live in pulumi-random / pulumi-tls resources, so they stay the same across
updates, and they are handed on only as secret Outputs.
"""

from __future__ import annotations

import pulumi
import pulumi_random as random
import pulumi_tls as tls

from components.settings import Settings

GENERATED_TOKEN_LENGTH = 40


def auth_token(name: str, settings: Settings, parent: pulumi.Resource) -> pulumi.Output[str]:
    """The configured token, or a generated alphanumeric one (token68-safe, no quoting needed)."""
    if settings.auth_token:
        return pulumi.Output.secret(settings.auth_token)
    generated = random.RandomPassword(
        f"{name}-auth-token",
        length=GENERATED_TOKEN_LENGTH,
        special=False,
        opts=pulumi.ResourceOptions(parent=parent),
    )
    return pulumi.Output.secret(generated.result)


def ssh_key(
    name: str, settings: Settings, parent: pulumi.Resource
) -> tuple[pulumi.Input[str], pulumi.Output[str] | None]:
    """(public key, secret private key or None when the public key came from config)."""
    if settings.ssh_public_key:
        return settings.ssh_public_key, None
    key = tls.PrivateKey(f"{name}-ssh-key", algorithm="ED25519", opts=pulumi.ResourceOptions(parent=parent))
    return key.public_key_openssh, pulumi.Output.secret(key.private_key_openssh)
