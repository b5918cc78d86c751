"""Which running libvirt domains are targets: name globs, the metadata filter, and their labels.

:func:`targets_for` is pure: the domains of one ``libvirt:`` entry in, :class:`TargetConfig` out. The
metadata XML comes from the management layer (Nova, oVirt...) and is read as untrusted input: at most
:data:`~migpredictd.libvirt.api.MAX_METADATA_BYTES`, no DTD, every value cut to a label's length and
stripped of control characters.
"""

from __future__ import annotations

import fnmatch
import socket
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence

from migpredictd.config.schema import (
    MAX_LABEL_VALUE_LENGTH,
    Labels,
    LibvirtSource,
    MetadataLabels,
    TargetConfig,
)
from migpredictd.core.address import DomainRef
from migpredictd.libvirt.api import MAX_METADATA_BYTES, Domain
from migpredictd.libvirt.measure import pid_file_for

__all__ = ["metadata_values", "namespaces", "qmp_listener_pid", "selected", "targets_for"]


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def metadata_values(xml: str, paths: Mapping[str, str]) -> dict[str, str] | None:
    """``label -> value`` for each path found in the metadata element ``xml`` (paths relative to it, by
    local names: ``owner/project``, ``owner/project/@uuid``); None when ``xml`` is not usable XML."""
    if len(xml) > MAX_METADATA_BYTES or "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        return None
    try:
        root = ET.fromstring(xml)  # noqa: S314 (no DTD, bounded: checked above)
    except ET.ParseError:
        return None
    out: dict[str, str] = {}
    for label, path in paths.items():
        node: ET.Element | None = root
        parts = path.split("/")
        attribute = parts.pop()[1:] if parts[-1].startswith("@") else None
        for part in parts:
            node = next((c for c in node if _local(c.tag) == part), None) if node is not None else None
        if node is None:
            continue
        if attribute is not None:
            value = next((v for k, v in node.attrib.items() if _local(k) == attribute), None)
        else:
            value = "".join(node.itertext())
        if value is not None:
            clean = "".join(ch for ch in value.strip() if ch.isprintable())[:MAX_LABEL_VALUE_LENGTH]
            out[label] = clean
    return out


def selected(domain: Domain, source: LibvirtSource) -> dict[str, str] | None:  # noqa: PLR0911
    """The domain's metadata labels if ``source`` measures it, else None."""
    if not any(fnmatch.fnmatchcase(domain.name, g) for g in source.names):
        return None
    if any(fnmatch.fnmatchcase(domain.name, g) for g in source.exclude):
        return None
    meta: MetadataLabels | None = source.metadata
    if meta is None:
        return {}
    xml = domain.metadata.get(meta.namespace)
    if xml is None:
        return None if meta.require else ({} if not meta.match else None)
    values = metadata_values(xml, meta.labels)
    if values is None:
        return None if meta.require or meta.match else {}
    for label, glob in meta.match.items():
        if label not in values or not fnmatch.fnmatchcase(values[label], glob):
            return None
    return values


def targets_for(source: LibvirtSource, domains: Iterable[Domain]) -> list[TargetConfig]:
    """The targets of ``source`` among ``domains``: one per selected domain, named by the domain."""
    out: list[TargetConfig] = []
    for d in domains:
        values = selected(d, source)
        if values is None:
            continue
        labels = {**source.labels, **values, "uuid": d.uuid, "libvirt_uri": source.uri}
        out.append(
            TargetConfig(
                name=d.name,
                qmp="",
                labels=Labels(labels),
                interval_seconds=source.interval_seconds,
                measurement=source.measurement,
                source=f"{source.source} (libvirt domain {d.uuid})",
                domain=DomainRef(
                    uri=source.uri,
                    name=d.name,
                    uuid=d.uuid,
                    pid_file=pid_file_for(source.uri, d.name, source.pid_dir),
                ),
                policies=source.policies,
            )
        )
    return out


def namespaces(sources: Sequence[LibvirtSource]) -> list[str]:
    """The metadata namespaces any of ``sources`` reads."""
    return sorted({s.metadata.namespace for s in sources if s.metadata is not None})


def qmp_listener_pid(path: str, *, timeout: float = 1.0) -> int | None:
    """The PID of the process listening on the unix socket ``path`` (``SO_PEERCRED`` of a connection that
    sends nothing and closes at once), or None; tells which domain a static QMP target belongs to."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            pid: int = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None
