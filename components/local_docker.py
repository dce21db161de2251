"""`ChromaLocalDocker`: the same Chroma + Caddy pair as the VM, in Docker on this machine.

The proxy config, Chroma's environment, the images, the health checks and the log limits come from
components.runtime, as on the VM; only the proxy's site differs (plain HTTP, published on
127.0.0.1:hostPort). Chroma runs in the proxy's network namespace and listens on its loopback, so
nothing but the proxy reaches it: not the host (which routes to the stack's bridge), not another
container. Its data lives in a named volume. As on the VM, every start of Chroma's container is
checked by the guard container first (scripts/chroma_data.py, cloud-init/chroma-start.sh), so a
crash is repaired before clients return; the guard shares the same namespace to reach Chroma.
"""

from __future__ import annotations

from pathlib import Path

import pulumi
import pulumi_docker as docker

from components import credentials, runtime
from components.runtime import HEARTBEAT_PATH, ProxySite
from components.settings import Settings

# Inside its container the proxy listens here; Docker publishes it on 127.0.0.1:hostPort.
PROXY_CONTAINER_PORT = 8080
LOCAL_SITE = ProxySite(site_address=f"http://:{PROXY_CONTAINER_PORT}")
CADDYFILE_PATH = "/etc/caddy/Caddyfile"
# Root only, as on the VM; Caddy's image runs as root. A new token re-creates the proxy container here
# (its uploads change), where the VM's proxy reads the replaced file without a restart.
TOKEN_FILE_PERMISSIONS = "0600"  # noqa: S105 - a file mode, not a secret
# `pulumi up` returns once both containers report healthy, or fails after this long.
HEALTHY_WITHIN_SECONDS = 180


def _healthcheck(test: tuple[str, ...]) -> docker.ContainerHealthcheckArgs:
    return docker.ContainerHealthcheckArgs(
        tests=list(test),
        interval=f"{runtime.HEALTHCHECK_INTERVAL_SECONDS}s",
        timeout=f"{runtime.HEALTHCHECK_TIMEOUT_SECONDS}s",
        retries=runtime.HEALTHCHECK_RETRIES,
        start_period=f"{runtime.HEALTHCHECK_START_PERIOD_SECONDS}s",
        start_interval=f"{runtime.HEALTHCHECK_START_INTERVAL_SECONDS}s",
    )


def _upload(path: str, source: Path) -> docker.ContainerUploadArgs:
    return docker.ContainerUploadArgs(file=path, content=source.read_text(encoding="utf-8"), executable=True)


def _bounded_logs() -> dict[str, object]:
    return {"log_driver": runtime.LOG_DRIVER, "log_opts": dict(runtime.LOG_OPTIONS)}


class ChromaLocalDocker(pulumi.ComponentResource):
    """Chroma behind the authenticating proxy on the local Docker engine."""

    endpoint: pulumi.Output[str]
    heartbeat_url: pulumi.Output[str]
    auth_token: pulumi.Output[str]
    volume_name: pulumi.Output[str]

    def __init__(self, name: str, args: Settings, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("chroma-infra:local:ChromaLocalDocker", name, None, opts)
        self._settings = args
        child = pulumi.ResourceOptions(parent=self)
        # Containers have fixed names, and Docker refuses a second container of the same name: a
        # replacement (a new image, a new proxy namespace) must remove the old one first.
        named_container = pulumi.ResourceOptions(parent=self, delete_before_replace=True)
        prefix = f"{pulumi.get_project()}-{pulumi.get_stack()}"
        self.auth_token = credentials.auth_token(name, args, self)

        network = docker.Network(f"{name}-net", name=prefix, opts=child)
        volume = docker.Volume(
            f"{name}-data",
            name=f"{prefix}-data",
            # A fixed name and retain_on_delete: destroying the stack keeps the data, and the next
            # `pulumi up` finds the same volume again.
            opts=pulumi.ResourceOptions(parent=self, retain_on_delete=args.protect_data_disk),
        )
        chroma_image = docker.RemoteImage(
            f"{name}-chroma-image", name=runtime.chroma_image(args.chroma_version), keep_locally=True, opts=child
        )
        proxy_image = docker.RemoteImage(f"{name}-proxy-image", name=runtime.CADDY_IMAGE, keep_locally=True, opts=child)
        guard_image = docker.RemoteImage(f"{name}-guard-image", name=runtime.GUARD_IMAGE, keep_locally=True, opts=child)
        data = docker.ContainerVolumeArgs(volume_name=volume.name, container_path=runtime.CHROMA_DATA_PATH)
        token_file = self.auth_token.apply(runtime.token_file_content)
        # The proxy owns the network namespace that Chroma and the guard join: it restarts far less
        # often than Chroma, and a container that joins a namespace loses it when the owner restarts.
        proxy = docker.Container(
            f"{name}-proxy",
            name=f"{prefix}-proxy",
            image=proxy_image.image_id,
            ports=[docker.ContainerPortArgs(internal=PROXY_CONTAINER_PORT, external=args.host_port, ip="127.0.0.1")],
            uploads=[
                docker.ContainerUploadArgs(
                    file=CADDYFILE_PATH, content=runtime.render_caddyfile(LOCAL_SITE, args.auth_header, args.acme_email)
                ),
                docker.ContainerUploadArgs(
                    file=LOCAL_SITE.token_file,
                    content=pulumi.Output.secret(token_file),
                    permissions=TOKEN_FILE_PERMISSIONS,
                ),
            ],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=network.name)],
            healthcheck=_healthcheck(runtime.PROXY_HEALTHCHECK),
            restart="unless-stopped",
            wait=True,
            wait_timeout=HEALTHY_WITHIN_SECONDS,
            **_bounded_logs(),
            opts=named_container,
        )
        # By id, not name: a re-created proxy is a new namespace, and these must be re-created into it.
        in_proxy_namespace = proxy.id.apply(lambda proxy_id: f"container:{proxy_id}")
        # Answers every start of Chroma's container (chroma-start.sh): repair after a crash, keep the log.
        docker.Container(
            f"{name}-guard",
            name=f"{prefix}-guard",
            image=guard_image.image_id,
            command=list(runtime.GUARD_COMMAND),
            uploads=[_upload(runtime.DATA_TOOL_PATH, runtime.SCRIPTS_DIR / "chroma_data.py")],
            volumes=[data],
            network_mode=in_proxy_namespace,
            restart="unless-stopped",
            **_bounded_logs(),
            opts=named_container,
        )

        # Docker's API, as this provider uses it, has no oom_score_adj: chroma-start.sh sets it, which
        # needs CAP_SYS_RESOURCE.
        chroma_env = [f"{key}={value}" for key, value in runtime.chroma_env(args.otel).items()]
        chroma_env.append(f"CHROMA_OOM_SCORE_ADJ={runtime.CHROMA_OOM_SCORE_ADJ}")
        docker.Container(
            f"{name}-chroma",
            name=f"{prefix}-chroma",
            image=chroma_image.image_id,
            entrypoints=list(runtime.CHROMA_ENTRYPOINT),
            command=list(runtime.CHROMA_COMMAND),
            uploads=[_upload(runtime.START_SCRIPT_PATH, runtime.TEMPLATE_DIR / "chroma-start.sh")],
            envs=pulumi.Output.secret(chroma_env) if args.otel_headers else chroma_env,
            volumes=[data],
            capabilities=docker.ContainerCapabilitiesArgs(adds=["SYS_RESOURCE"]),
            network_mode=in_proxy_namespace,
            healthcheck=_healthcheck(runtime.CHROMA_HEALTHCHECK),
            stop_signal=runtime.CHROMA_STOP_SIGNAL,
            stop_timeout=runtime.CHROMA_STOP_GRACE_SECONDS,
            destroy_grace_seconds=runtime.CHROMA_STOP_GRACE_SECONDS,
            restart="unless-stopped",
            wait=True,
            wait_timeout=HEALTHY_WITHIN_SECONDS,
            **_bounded_logs(),
            opts=named_container,
        )

        self.endpoint = pulumi.Output.from_input(f"http://127.0.0.1:{args.host_port}")
        self.heartbeat_url = pulumi.Output.from_input(f"http://127.0.0.1:{args.host_port}{HEARTBEAT_PATH}")
        self.volume_name = volume.name
        self.register_outputs(self.exports())

    def exports(self) -> dict[str, pulumi.Input[str]]:
        """Stack outputs, named as the Azure stack names them where they apply."""
        return {
            "endpoint": self.endpoint,
            "heartbeatUrl": self.heartbeat_url,
            "authHeader": self._settings.auth_header,
            "authToken": self.auth_token,
            "chromaVersion": self._settings.chroma_version,
            "dataVolume": self.volume_name,
        }
