"""The model forward has no host synchronisation and no data-dependent shape (convention 8), so it
can be traced as one graph and captured in a CUDA graph for a fixed batch shape.

On CPU, TorchDynamo's ``explain`` checks the first part: ``.item()``, ``.tolist()``, ``nonzero``,
boolean-mask indexing or Python control flow on tensor values in the forward would be a graph
break (or a recorded break reason), so the forward must trace as exactly one graph with none.
(Tracing only, no code generation: seconds.) A ``.cpu()`` is a no-op on CPU tensors and is caught
only by the GPU test, which also runs one forward under ``torch.cuda.set_sync_debug_mode("error")``.
The CUDA-graph capture itself needs a GPU and is skipped here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import golden_batch, golden_model_instance, random_batch

from e3relax_fast import Batch, build_graph, ops
from e3relax_fast.model import E3Relax

CUDA = torch.cuda.is_available()


def _forward_fn(model):
    def f(z, pos, cell, ptr, edge_index, offsets):
        out = model(Batch(z, pos, cell, ptr, edge_index, offsets))
        return torch.stack(out.positions), torch.stack(out.cells)

    return f


@pytest.mark.parametrize("paper_compat", [True, False], ids=["paper", "default"])
def test_forward_traces_as_one_graph(golden_model, paper_compat):
    model = golden_model_instance(golden_model, paper_compat=paper_compat).eval()
    model.backend = "reference"
    b = golden_batch(golden_model)
    args = (b.atomic_numbers, b.positions, b.cells, b.ptr, b.edge_index, b.cell_offsets)
    torch._dynamo.reset()
    with torch.no_grad():
        report = torch._dynamo.explain(_forward_fn(model))(*args)
    torch._dynamo.reset()
    assert [str(r.reason) for r in report.break_reasons] == []
    assert report.graph_count == 1 and report.graph_break_count == 0


def _cuda_backends() -> list[str]:
    if not CUDA:
        return ["reference"]
    return [b for b in ("reference", "triton", "cuda") if b in ops.available("message_passing")]


@pytest.mark.gpu  # CUDA-graph capture needs a GPU
@pytest.mark.parametrize("backend", _cuda_backends())
def test_forward_cuda_graph_capture(backend):
    rng = np.random.default_rng(7)
    pos, cells, ptr = random_batch(rng, [1, 5, 12, 3], ["tiny", "general", "skewed", "vacuum"])
    dev = torch.device("cuda")
    pos, cells, ptr = pos.float().to(dev), cells.float().to(dev), ptr.to(dev)
    g = build_graph(pos, cells, ptr, 6.0, 50)
    z = torch.from_numpy(rng.integers(1, 90, pos.shape[0])).to(dev)
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=64, num_layers=3, backend=backend).to(dev).eval()
    static = [z, pos.clone(), cells.clone(), ptr, g.edge_index, g.cell_offsets]
    f = _forward_fn(model)
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compilation, allocator) outside the capture
            for _ in range(2):
                f(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_p, out_c = f(*static)
        # New coordinates of the same shape: replay must give what eager gives on them.
        shifted = pos + 0.05 * torch.randn_like(pos)
        static[1].copy_(shifted)
        graph.replay()
        torch.cuda.synchronize()
        ref_p, ref_c = f(z, shifted, cells, ptr, g.edge_index, g.cell_offsets)
        torch.cuda.set_sync_debug_mode("error")  # any host sync in the forward raises
        try:
            f(*static)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out_p, ref_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_c, ref_c, rtol=1e-5, atol=1e-5)
