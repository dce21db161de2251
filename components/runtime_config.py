"""The runtime config a running VM gets through its run command, and that run command's input.

Everything that changes with the deployment's settings (the token, the auth header, acmeEmail, the
Chroma version, OTel) lives in three files on the VM: the proxy config, the token file the proxy
reads at each request, and the compose file. They travel as run command parameters, and
/usr/local/sbin/chroma-apply (cloud-init/chroma-apply.sh, shipped in the bootstrap) puts them in
place with the least disruption. The token and the compose file (which may hold OTel headers) go in
protected parameters; the proxy config holds no secret, so it is a plain parameter beside the image,
and a plan shows a version, header or email change apart from a token rotation.

`render_run_command` gives exactly what Azure's agent is handed; `as_guest_script` turns it into
one script that does in a guest what the agent does (parameters as environment variables, then the
script), for running the same input over SSH or a serial console.
"""

from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass, field

from components import cloud_config, runtime
from components.runtime import OtelSettings, ProxySite

RUN_COMMAND_NAME = "chroma-apply"
# What the agent runs. The logic lives in the bootstrap's chroma-apply, which reads the parameters
# from the environment; this stays a POSIX sh line, whatever shell the agent starts it with.
RUN_COMMAND_SCRIPT = f"#!/bin/sh\n# Applies this run command's parameters.\nexec {cloud_config.APPLY_SCRIPT}\n"
# Covers chroma-apply's wait for cloud-init on a new VM (1200 s), an image pull, and the health
# bound for the new and then the rolled-back container (180 s each).
RUN_COMMAND_TIMEOUT_SECONDS = 2400

IMAGE_PARAMETER = "CHROMA_IMAGE"
CADDYFILE_PARAMETER = "CHROMA_CADDYFILE_B64"
COMPOSE_PARAMETER = "CHROMA_COMPOSE_B64"
# The token as is: token68 needs no encoding to travel in an environment variable.
TOKEN_PARAMETER = "CHROMA_AUTH_TOKEN"  # noqa: S105 - a parameter name, not a secret


def vm_site(fqdn: str) -> ProxySite:
    """The VM's proxy: ACME certificate for the FQDN, and `caddy reload` on the admin socket."""
    return ProxySite(site_address=fqdn, admin_socket=runtime.PROXY_ADMIN_SOCKET)


@dataclass(frozen=True)
class RuntimeFiles:
    """What chroma-apply installs: the proxy config, the compose file, and the token for the token file."""

    caddyfile: str = field(repr=False)
    compose: str = field(repr=False)
    token: str = field(repr=False)


def render_runtime_files(
    *,
    site: ProxySite,
    chroma_version: str,
    auth_header: str,
    token: str,
    otel: OtelSettings | None,
    acme_email: str | None,
) -> RuntimeFiles:
    """The proxy config for `site`, the compose file and the token, from the one runtime renderer."""
    return RuntimeFiles(
        caddyfile=runtime.render_caddyfile(site, auth_header, acme_email),
        compose=cloud_config.render_compose(chroma_version, otel),
        token=runtime.checked_token(token),
    )


@dataclass(frozen=True)
class RunCommand:
    """A run command's input: its script, its plain parameters and its protected ones."""

    script: str
    parameters: dict[str, str]
    protected_parameters: dict[str, str] = field(repr=False)

    def environment(self) -> dict[str, str]:
        """What the script sees: every parameter, plain or protected, as an environment variable."""
        return {**self.parameters, **self.protected_parameters}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def plain_parameters(caddyfile: str, chroma_version: str) -> dict[str, str]:
    """The run command's parameters that hold no secret: the image and the proxy config."""
    return {IMAGE_PARAMETER: runtime.chroma_image(chroma_version), CADDYFILE_PARAMETER: _b64(caddyfile)}


def protected_parameters(token: str, compose: str) -> dict[str, str]:
    """The run command's secret parameters: the token, and the compose file (it may hold OTel headers)."""
    return {TOKEN_PARAMETER: runtime.checked_token(token), COMPOSE_PARAMETER: _b64(compose)}


def run_command_for(files: RuntimeFiles, chroma_version: str) -> RunCommand:
    """The run command that installs `files` and expects Chroma's image for `chroma_version`."""
    return RunCommand(
        script=RUN_COMMAND_SCRIPT,
        parameters=plain_parameters(files.caddyfile, chroma_version),
        protected_parameters=protected_parameters(files.token, files.compose),
    )


def render_run_command(
    *,
    fqdn: str,
    chroma_version: str,
    auth_header: str,
    token: str,
    otel: OtelSettings | None,
    acme_email: str | None,
) -> RunCommand:
    """Exactly what the Azure component hands the run command for these settings."""
    files = render_runtime_files(
        site=vm_site(fqdn),
        chroma_version=chroma_version,
        auth_header=auth_header,
        token=token,
        otel=otel,
        acme_email=acme_email,
    )
    return run_command_for(files, chroma_version)


def as_guest_script(command: RunCommand) -> str:
    """One sh script that does what Azure's agent does: export the parameters, run the script.

    Feed it on stdin to `sh -s` as root in the guest (e.g. `ssh root@guest sh -s < script`), so the
    secrets travel in the stream and never on a command line.
    """
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in command.environment().items())
    body = "\n".join(line for line in command.script.splitlines() if not line.startswith("#!"))
    return f"#!/bin/sh\nset -e\n{exports}{body}\n"
