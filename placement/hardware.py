"""Hardware catalog (peak FLOP/s, memory, links) and cluster specs such as `4x8xA100-80GB` or a YAML file."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

GiB = 1 << 30


@dataclass(frozen=True)
class HardwareSpec:
    """One device kind. Bandwidths are bytes/s per device and per direction; latencies are seconds."""

    name: str
    dense_flops: tuple[tuple[str, float], ...]  # (dtype, peak dense FLOP/s) pairs; tuple keeps it hashable
    memory_bytes: float
    memory_bandwidth: float
    intra_node_link: str
    intra_node_bandwidth: float
    intra_node_latency: float
    inter_node_bandwidth: float
    inter_node_latency: float

    def __post_init__(self) -> None:
        for field in ("memory_bytes", "memory_bandwidth", "intra_node_bandwidth", "inter_node_bandwidth"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field}: must be positive, got {getattr(self, field)!r}")
        for field in ("intra_node_latency", "inter_node_latency"):
            if not getattr(self, field) >= 0:
                raise ValueError(f"{field}: must be >= 0, got {getattr(self, field)!r}")

    def flops(self, dtype: str) -> float:
        table = dict(self.dense_flops)
        # bfloat16 and float16 run on the same tensor cores at the same rate.
        key = "float16" if dtype == "bfloat16" and "bfloat16" not in table else dtype
        if key not in table:
            raise ValueError(f"dtype: {self.name} has no peak FLOP/s for {dtype!r}; it lists {sorted(table)}")
        return table[key]


def _gpu(name, fp16_tflops, fp32_tflops, mem_gb, bw_tbs, link, link_gbs, inter_gbit, fp8_tflops=None):
    flops = [("float16", fp16_tflops * 1e12), ("float32", fp32_tflops * 1e12)]
    if fp8_tflops:
        flops.append(("float8", fp8_tflops * 1e12))
    return HardwareSpec(name=name, dense_flops=tuple(flops), memory_bytes=mem_gb * 1e9,
                        memory_bandwidth=bw_tbs * 1e12, intra_node_link=link, intra_node_bandwidth=link_gbs * 1e9,
                        intra_node_latency=3e-6 if link == "NVLink" else 8e-6,
                        inter_node_bandwidth=inter_gbit * 1e9 / 8, inter_node_latency=10e-6)


def _this_cpu() -> HardwareSpec:
    # A rough model of the dev box: ~50 GFLOP/s fp32 per core (AVX2 FMA at a realistic clock), memory from sysconf.
    cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 16 * GiB
    return HardwareSpec(name="cpu", dense_flops=(("float32", 50e9 * cores), ("float16", 12e9 * cores)),
                        memory_bytes=float(memory), memory_bandwidth=20e9, intra_node_link="shm",
                        intra_node_bandwidth=8e9, intra_node_latency=20e-6, inter_node_bandwidth=1.25e9,
                        inter_node_latency=50e-6)


# Datasheet numbers (dense, no sparsity). Intra-node: NVLink per direction; L40S talks over PCIe Gen4 x16.
# Inter-node: one NIC per GPU (HDR 200 Gb/s on A100 systems, NDR 400 Gb/s on H100/H200 systems).
HARDWARE: dict[str, HardwareSpec] = {
    spec.name: spec
    for spec in (
        _gpu("A100-40GB", 312, 19.5, 40, 1.555, "NVLink", 300, 200),
        _gpu("A100-80GB", 312, 19.5, 80, 2.039, "NVLink", 300, 200),
        _gpu("H100-80GB", 989, 67, 80, 3.35, "NVLink", 450, 400, fp8_tflops=1979),
        _gpu("H200", 989, 67, 141, 4.8, "NVLink", 450, 400, fp8_tflops=1979),
        _gpu("L40S", 362, 91.6, 48, 0.864, "PCIe", 32, 200, fp8_tflops=733),
        _this_cpu(),
    )
}


def get_hardware(name: str) -> HardwareSpec:
    if name not in HARDWARE:
        raise ValueError(f"hardware: unknown {name!r}; known: {', '.join(HARDWARE)}")
    return HARDWARE[name]


@dataclass(frozen=True)
class ClusterSpec:
    """`nodes` machines with `devices_per_node` identical devices each."""

    nodes: int
    devices_per_node: int
    hardware: HardwareSpec

    def __post_init__(self) -> None:
        for field in ("nodes", "devices_per_node"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field}: must be a positive integer, got {value!r}")

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def name(self) -> str:
        return f"{self.nodes}x{self.devices_per_node}x{self.hardware.name}"


_CLUSTER_RE = re.compile(r"^(?:(\d+)x)?(\d+)x(.+)$")
_YAML_KEYS = {"nodes", "devices_per_node", "hardware", "overrides"}


def parse_cluster(text: str) -> ClusterSpec:
    """`4x8xA100-80GB` (nodes x devices x hardware) or `8xA100-80GB` (one node)."""
    match = _CLUSTER_RE.match(text.strip())
    if not match:
        raise ValueError(f"cluster: {text!r} is not NODESxDEVICESxHARDWARE (e.g. 4x8xA100-80GB) or a YAML file")
    nodes = int(match.group(1) or 1)
    return ClusterSpec(nodes=nodes, devices_per_node=int(match.group(2)), hardware=get_hardware(match.group(3)))


def cluster_from_mapping(data: Mapping[str, Any]) -> ClusterSpec:
    if not isinstance(data, Mapping):
        raise ValueError(f"cluster: expected a mapping, got {type(data).__name__}")
    unknown = set(data) - _YAML_KEYS
    if unknown:
        raise ValueError(f"cluster: unknown keys {sorted(unknown)}; expected {sorted(_YAML_KEYS)}")
    for key in ("nodes", "devices_per_node", "hardware"):
        if key not in data:
            raise ValueError(f"cluster.{key}: missing")
    hardware = get_hardware(str(data["hardware"]))
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError("cluster.overrides: expected a mapping of HardwareSpec fields")
    allowed = {f.name for f in dataclasses.fields(HardwareSpec)} - {"name", "dense_flops"}
    for key, value in overrides.items():
        if key not in allowed:
            raise ValueError(f"cluster.overrides.{key}: unknown field; allowed: {sorted(allowed)}")
    numbers = {}
    for key, value in overrides.items():
        if key == "intra_node_link":
            numbers[key] = str(value)
            continue
        try:  # YAML 1.1 reads 3.0e9 (no sign in the exponent) as a string
            numbers[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"cluster.overrides.{key}: expected a number, got {value!r}") from None
    hardware = dataclasses.replace(hardware, **numbers)
    return ClusterSpec(nodes=data["nodes"], devices_per_node=data["devices_per_node"], hardware=hardware)


def load_cluster(text: str) -> ClusterSpec:
    """A cluster string, or a YAML file with nodes, devices_per_node, hardware and optional overrides."""
    if text.endswith((".yaml", ".yml")) or os.path.isfile(text):
        import yaml

        if not os.path.isfile(text):
            raise ValueError(f"cluster: file {text!r} not found")
        with open(text, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as exc:
                raise ValueError(f"cluster: {text} is not valid YAML ({exc})") from exc
        return cluster_from_mapping(data)
    return parse_cluster(text)
