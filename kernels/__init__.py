"""Triton kernels of e3relax-fast (installed as ``e3relax_fast.kernels``).

One module per op, each the fused twin of the same-named op in ``e3relax_fast.reference``:

* ``message_passing`` — atom–atom message passing (spec §6 Step B), forward and backward;
  entry point :func:`message_passing.message_passing`.
* ``lattice_message`` — lattice -> atom message of one lattice node (spec §6 Step 0, Step A),
  forward and backward; entry point :func:`lattice_message.lattice_message`.
* ``lattice_pool`` — per-crystal mean of atom features (spec §6 Step 0 centres, Step E pooling);
  entry point :func:`lattice_pool.lattice_pool`.
* ``radius_graph`` — batched periodic radius graph with the per-centre top-K cut (spec §3);
  entry point :func:`radius_graph.radius_graph`.

and the modules they share:

* ``basis`` — Triton device functions of the radial basis and its envelope, the three chunks'
  biases, and the float-constants tensor of the two message ops.
* ``utils`` — the interpreter switch, output buffers that tests poison, the launch-configuration
  base classes, and the ahead-of-time compile for a GPU target (no device needed).

This package imports nothing and registers nothing: whoever dispatches the ops imports the op
modules when needed and decides where they can run (a CUDA device, or the Triton CPU interpreter
selected with ``TRITON_INTERPRET=1`` before a kernel module is imported). An op module needs only
torch and triton, and of this package only ``e3relax_fast.geometry`` (the spec constants).
"""
