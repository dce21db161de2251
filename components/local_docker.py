"""`ChromaLocalDocker`: the same Chroma + Caddy pair as the VM, in Docker on this machine.

The proxy config, Chroma's environment, the images and the health checks come from
components.runtime, as on the VM; only the proxy's site differs (plain HTTP, published on
127.0.0.1:hostPort). Chroma is published on no host port, and its data lives in a named volume.
"""

from __future__ import annotations

import pulumi
import pulumi_docker as docker

from components import credentials, runtime
from components.runtime import HEARTBEAT_PATH, ProxySite
from components.settings import Settings

# Inside its container the proxy listens here; Docker publishes it on 127.0.0.1:hostPort.
PROXY_CONTAINER_PORT = 8080
LOCAL_SITE = ProxySite(site_address=f"http://:{PROXY_CONTAINER_PORT}")
CADDYFILE_PATH = "/etc/caddy/Caddyfile"
# `pulumi up` returns once both containers report healthy, or fails after this long.
HEALTHY_WITHIN_SECONDS = 180


def _healthcheck(test: tuple[str, ...]) -> docker.ContainerHealthcheckArgs:
    return docker.ContainerHealthcheckArgs(
        tests=list(test),
        interval=f"{runtime.HEALTHCHECK_INTERVAL_SECONDS}s",
        timeout=f"{runtime.HEALTHCHECK_TIMEOUT_SECONDS}s",
        retries=runtime.HEALTHCHECK_RETRIES,
        start_period=f"{runtime.HEALTHCHECK_START_PERIOD_SECONDS}s",
    )


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

        chroma_env = [f"{key}={value}" for key, value in runtime.chroma_env(args.otel).items()]
        chroma = docker.Container(
            f"{name}-chroma",
            name=f"{prefix}-chroma",
            image=chroma_image.image_id,
            envs=pulumi.Output.secret(chroma_env) if args.otel_headers else chroma_env,
            volumes=[docker.ContainerVolumeArgs(volume_name=volume.name, container_path="/data")],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=network.name, aliases=["chroma"])],
            healthcheck=_healthcheck(runtime.CHROMA_HEALTHCHECK),
            restart="unless-stopped",
            wait=True,
            wait_timeout=HEALTHY_WITHIN_SECONDS,
            opts=child,
        )
        caddyfile = self.auth_token.apply(
            lambda token: runtime.render_caddyfile(LOCAL_SITE, args.auth_header, token, args.acme_email)
        )
        docker.Container(
            f"{name}-proxy",
            name=f"{prefix}-proxy",
            image=proxy_image.image_id,
            ports=[docker.ContainerPortArgs(internal=PROXY_CONTAINER_PORT, external=args.host_port, ip="127.0.0.1")],
            uploads=[docker.ContainerUploadArgs(file=CADDYFILE_PATH, content=pulumi.Output.secret(caddyfile))],
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=network.name)],
            healthcheck=_healthcheck(runtime.PROXY_HEALTHCHECK),
            restart="unless-stopped",
            wait=True,
            wait_timeout=HEALTHY_WITHIN_SECONDS,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[chroma]),
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
