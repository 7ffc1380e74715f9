"""The spec §14 cost model of the atom–atom message op, one layer and the whole model: FLOP and
DRAM bytes, from which the benchmarks derive GFLOP/s, GB/s and "% peak".

2 FLOP per multiply-add; H hidden channels, R = 128 radial basis functions, b = bytes per element
of the working dtype, N atoms, E edges, G crystals, k = E/N edges per receiver.

* FLOP per edge of the op: ``F_e = 6RH + 25H + 6R + 30`` — gate GEMM W f_e (2·R·3H), bias (3H),
  x_proj[j] ⊙ gate / √3 (6H), b1 ⊙ v_j + u ⊗ b2 scaled (12H), receiver sums (4H), basis (6R) and
  geometry (~30). At H=512, R=128, k=56 this is the spec's ≈22.8 MFLOP per atom.
* Bytes per edge, **unfused** (``eager``, ``compile``): every E-sized tensor the eager
  formulation materialises, written once and read by each consumer, gathers counted as a read of
  the source row plus a write: ``B_e = b·(68H + 10R + 50) + 56`` (68H: gate, gathered x_proj[j] and
  vec[j], products, message vectors, the index_add read-modify-writes; 10R: the basis pipeline;
  50 + 56: geometry and int64 indices). ≈145 kB per edge at H=512 in float32, the top of the spec's
  50–130 kB range. torch.compile fuses some of it, so its GB/s column is the eager-equivalent rate.
* Bytes per edge, **fused** (kernels): compulsory DRAM traffic only, ``B_e = 16 + 6b + 10H·b/k``
  (source index and crystal, offsets and source position per edge; per receiver one read of the
  source state x_proj, vec (6H) and one write of ds, dv (4H)). The per-edge gathers of the source
  state (6H·b) and the W re-reads (3HR·b/k) are assumed to hit L2 and are not counted.
* Layer: ``E·F_e + N·(90H² + 18RH) + G·102H²`` FLOP (node GEMMs per atom: lattice local blocks
  60H² + 18RH, self-update 22H², node projection 4H², position update 4H²; per crystal, the three
  lattice global blocks 102H²); bytes ``E·B_e + P_layer·b + N·500H·b`` (the layer's weights read
  once, plus a rough count of the node-sized tensors an eager layer reads and writes). Model:
  L × layer. The benchmarks' per-edge columns are these totals divided by E.
"""

from __future__ import annotations

from dataclasses import dataclass


def op_flops_per_edge(h: int, r: int) -> float:
    return 6 * r * h + 25 * h + 6 * r + 30


def op_bytes_per_edge(h: int, r: int, b: int, k: float, fused: bool) -> float:
    if fused:
        return 16 + 6 * b + 10 * h * b / k
    return b * (68 * h + 10 * r + 50) + 56


def node_flops_per_atom(h: int, r: int) -> float:
    return 90 * h * h + 18 * r * h


def crystal_flops(h: int) -> float:
    return 102 * h * h


def layer_params(h: int, r: int) -> int:
    """Parameters of one layer (spec §7): 18,643,712 at H=512, R=128."""
    mp = (h * (h // 2) + h // 2) + ((h // 2) * 3 * h + 3 * h) + (3 * h * r + 3 * h)
    upd = 2 * h * h + (2 * h * h + h) + (3 * h * h + 3 * h)
    pos = 2 * (h * h + h) + h
    lat = 19 * h * h + 16 * h + 3 * h * r
    return mp + upd + pos + 3 * lat


@dataclass
class Cost:
    flops: float
    bytes: float
    model: str  # "unfused" / "fused"


def cost(part: str, h: int, r: int, layers: int, n: int, e: int, g: int, b: int, fused: bool) -> Cost:
    """Cost of ``part`` (``"op"``, ``"layer"`` or ``"model"``) on ``n`` atoms, ``e`` edges, ``g`` crystals."""
    k = e / max(n, 1)
    edge_f, edge_b = op_flops_per_edge(h, r), op_bytes_per_edge(h, r, b, k, fused)
    label = "fused" if fused else "unfused"
    if part == "op":
        return Cost(e * edge_f, e * edge_b, label)
    per_layer_f = e * edge_f + n * node_flops_per_atom(h, r) + g * crystal_flops(h)
    per_layer_b = e * edge_b + layer_params(h, r) * b + n * 500 * h * b
    nl = 1 if part == "layer" else layers
    return Cost(nl * per_layer_f, nl * per_layer_b, label)
