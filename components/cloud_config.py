"""The VM's cloud-config (the bootstrap), and the compose file the run command delivers.

The cloud-config holds only what does not change with the deployment's settings: packages, the
systemd units, the disk script and the apply script. Azure cannot update a VM's custom data, so
anything in it that changed would replace the VM. The proxy config, the token and the compose file
(the Chroma version, OTel) reach the running VM through the run command (components/runtime_config.py).

It is built as Python data and emitted with yaml.safe_dump; base64 happens only at the VM
boundary, in the component.
"""

from __future__ import annotations

import base64
import gzip
from typing import Any

import yaml

from components import runtime
from components.runtime import TEMPLATE_DIR, OtelSettings

CONFIG_DIR = "/etc/chroma"
DATA_MOUNT = "/srv/chroma"
CHROMA_DATA_DIR = f"{DATA_MOUNT}/data"
CADDY_DATA_DIR = f"{DATA_MOUNT}/caddy"
COMPOSE_FILE = f"{CONFIG_DIR}/compose.yaml"
# The proxy mounts this directory at /etc/caddy, not its files: a file mount would keep the old
# inode when the apply script replaces a file, and Caddy would go on reading the old config or token.
PROXY_CONFIG_DIR = f"{CONFIG_DIR}/proxy"
PROXY_CONFIG_MOUNT = "/etc/caddy"
CADDYFILE = f"{PROXY_CONFIG_DIR}/Caddyfile"
# runtime.PROXY_TOKEN_FILE as the VM sees it.
TOKEN_FILE = f"{PROXY_CONFIG_DIR}/token"
DISK_SCRIPT = "/usr/local/sbin/chroma-prepare-data-disk"
# On the host for the operator (verify, repair; README's runbook), and mounted into the guard.
DATA_TOOL = "/usr/local/sbin/chroma-data"
GUARD_JOURNAL_TAG = "chroma-guard"
# Mounted into the chroma container as its entrypoint.
START_SCRIPT = "/usr/local/lib/chroma/chroma-start.sh"
APPLY_SCRIPT = "/usr/local/sbin/chroma-apply"
UNIT_DIR = "/etc/systemd/system"
UNIT_FILES = ("chroma-data-disk.service", "srv-chroma.mount", "chroma.service")
# `systemd-escape --path --suffix=device /dev/disk/by-label/chroma-data`: the mount's device.
DATA_DEVICE_UNIT = r"dev-disk-by\x2dlabel-chroma\x2ddata.device"
DEVICE_TIMEOUT_DROP_IN = f"{UNIT_DIR}/{DATA_DEVICE_UNIT}.d/timeout.conf"
# Starts chroma.service when the data disk appears; sorts after Azure's own disk-link rules.
DATA_DISK_UDEV_RULE = "/etc/udev/rules.d/90-chroma-data-disk.rules"
# Azure refuses custom data over this many bytes of base64.
MAX_CUSTOM_DATA_BYTES = 65535


def _healthcheck(test: tuple[str, ...]) -> dict[str, Any]:
    return {
        "test": list(test),
        "interval": f"{runtime.HEALTHCHECK_INTERVAL_SECONDS}s",
        "timeout": f"{runtime.HEALTHCHECK_TIMEOUT_SECONDS}s",
        "retries": runtime.HEALTHCHECK_RETRIES,
        "start_period": f"{runtime.HEALTHCHECK_START_PERIOD_SECONDS}s",
        "start_interval": f"{runtime.HEALTHCHECK_START_INTERVAL_SECONDS}s",
    }


def _bounded_logs() -> dict[str, Any]:
    return {"driver": runtime.LOG_DRIVER, "options": dict(runtime.LOG_OPTIONS)}


def _escape_compose(value: Any) -> Any:
    """Compose interpolates $; the values here are literal."""
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, list):
        return [_escape_compose(item) for item in value]
    if isinstance(value, dict):
        return {key: _escape_compose(item) for key, item in value.items()}
    return value


def _bind(source: str, target: str, read_only: bool = False) -> dict[str, Any]:
    # create_host_path false: if the data disk is not mounted, the container fails to start
    # instead of writing to an empty folder on the OS disk.
    return {
        "type": "bind",
        "source": source,
        "target": target,
        "read_only": read_only,
        "bind": {"create_host_path": False},
    }


def render_compose(chroma_version: str, otel: OtelSettings | None) -> str:
    """Caddy on 80/443, and Chroma inside Caddy's network namespace, on its loopback only."""
    compose = {
        "name": "chroma",
        "services": {
            "proxy": {
                "image": runtime.CADDY_IMAGE,
                "restart": "unless-stopped",
                "ports": ["80:80", "443:443"],
                "volumes": [
                    _bind(PROXY_CONFIG_DIR, PROXY_CONFIG_MOUNT, read_only=True),
                    _bind(CADDY_DATA_DIR, "/data"),
                ],
                "healthcheck": _healthcheck(runtime.PROXY_HEALTHCHECK),
                "logging": _bounded_logs(),
            },
            "chroma": {
                "image": runtime.chroma_image(chroma_version),
                "entrypoint": list(runtime.CHROMA_ENTRYPOINT),
                "command": list(runtime.CHROMA_COMMAND),
                "restart": "unless-stopped",
                # No address of its own: no other process on the VM or container reaches Chroma.
                "network_mode": "service:proxy",
                # A joined container loses the namespace when its owner restarts: compose restarts
                # Chroma whenever it restarts the proxy.
                "depends_on": {"proxy": {"condition": "service_started", "restart": True}},
                "environment": runtime.chroma_env(otel),
                "volumes": [
                    _bind(CHROMA_DATA_DIR, runtime.CHROMA_DATA_PATH),
                    _bind(START_SCRIPT, runtime.START_SCRIPT_PATH, read_only=True),
                ],
                "healthcheck": _healthcheck(runtime.CHROMA_HEALTHCHECK),
                "stop_signal": runtime.CHROMA_STOP_SIGNAL,
                "stop_grace_period": f"{runtime.CHROMA_STOP_GRACE_SECONDS}s",
                "oom_score_adj": runtime.CHROMA_OOM_SCORE_ADJ,
                "logging": _bounded_logs(),
            },
            # Checks the data before each start of Chroma and rebuilds after a crash (chroma-start.sh).
            # In the proxy's namespace too: it reaches Chroma on that loopback.
            "guard": {
                "image": runtime.GUARD_IMAGE,
                "command": list(runtime.GUARD_COMMAND),
                "restart": "unless-stopped",
                "network_mode": "service:proxy",
                "depends_on": {"proxy": {"condition": "service_started", "restart": True}},
                "volumes": [
                    _bind(CHROMA_DATA_DIR, runtime.CHROMA_DATA_PATH),
                    _bind(DATA_TOOL, runtime.DATA_TOOL_PATH, read_only=True),
                ],
                # Its repairs and rebuild times go to the journal (journalctl -t chroma-guard), whose
                # own limits bound them.
                "logging": {"driver": "journald", "options": {"tag": GUARD_JOURNAL_TAG}},
            },
        },
    }
    return yaml.safe_dump(_escape_compose(compose), sort_keys=False)


class _LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings as literal blocks, so the files read as themselves on the VM."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_LiteralDumper.add_representer(str, _represent_str)


def _file(path: str, content: str, permissions: str) -> dict[str, str]:
    return {"path": path, "content": content, "owner": "root:root", "permissions": permissions}


def _compressed_file(path: str, content: str, permissions: str) -> dict[str, str]:
    # Custom data is capped at 64 KiB of base64; the data tool is the largest file by far.
    packed = base64.b64encode(gzip.compress(content.encode("utf-8"), mtime=0)).decode("ascii")
    return {**_file(path, packed, permissions), "encoding": "gz+b64"}


def render_cloud_config() -> str:
    """The VM's bootstrap cloud-config, as text starting with #cloud-config.

    It takes no settings on purpose: the same text for every chromaVersion, token, header, OTel
    setting and acmeEmail, so changing those never replaces the VM.
    """
    base = yaml.safe_load((TEMPLATE_DIR / "cloud-config.yaml").read_text(encoding="utf-8"))
    files = [
        _file(DISK_SCRIPT, (TEMPLATE_DIR / "prepare-data-disk.sh").read_text(encoding="utf-8"), "0755"),
        _file(APPLY_SCRIPT, (TEMPLATE_DIR / "chroma-apply.sh").read_text(encoding="utf-8"), "0755"),
        _file(START_SCRIPT, (TEMPLATE_DIR / "chroma-start.sh").read_text(encoding="utf-8"), "0755"),
        _compressed_file(DATA_TOOL, (runtime.SCRIPTS_DIR / "chroma_data.py").read_text(encoding="utf-8"), "0755"),
    ]
    files += [
        _file(f"{UNIT_DIR}/{unit}", (TEMPLATE_DIR / unit).read_text(encoding="utf-8"), "0644") for unit in UNIT_FILES
    ]
    files.append(
        _file(
            DEVICE_TIMEOUT_DROP_IN,
            (TEMPLATE_DIR / "chroma-data-device-timeout.conf").read_text(encoding="utf-8"),
            "0644",
        )
    )
    files.append(
        _file(DATA_DISK_UDEV_RULE, (TEMPLATE_DIR / "chroma-data-disk.rules").read_text(encoding="utf-8"), "0644")
    )
    document = {**base, "write_files": files}
    return "#cloud-config\n" + yaml.dump(document, Dumper=_LiteralDumper, sort_keys=False, width=1000)


def write_files(cloud_config: str) -> dict[str, str]:
    """Path -> content of the files a rendered cloud-config writes (for tests and the local stack)."""
    return {entry["path"]: _decoded(entry) for entry in yaml.safe_load(cloud_config)["write_files"]}


def _decoded(entry: dict[str, str]) -> str:
    if entry.get("encoding") == "gz+b64":
        return gzip.decompress(base64.b64decode(entry["content"])).decode("utf-8")
    return entry["content"]
