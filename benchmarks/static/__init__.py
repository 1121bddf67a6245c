"""Performance measured without a GPU: ``python -m benchmarks --static``.

Two parts, both deterministic, both written to ``benchmarks/results/static/``:

* **The static audit** (:mod:`benchmarks.static.audit`): every kernel variant
  the ops launch, compiled for sm_90 as Triton's launcher would compile it,
  with its registers, spills, shared memory, occupancy on an H100, the width of
  its global loads and stores, and its SASS instructions per element on the
  path a tile executes, set against an H100's issue rate and bandwidth.
* **Counts** (:mod:`benchmarks.static.counts`): kernels launched, bytes kept for
  the backward and modelled memory traffic per op and per training step, for
  the eager reference, ``torch.compile`` and fastvae, set against the byte
  model (:mod:`benchmarks.static.model`) and the kernels' docstring tables.

What to add when the code grows (one entry each):

* a new kernel: its reads and writes in :data:`benchmarks.static.kernels.KERNELS`;
* a new op: its benchmark case in :func:`benchmarks.ops.op_cases` (the audit and
  the counts take every case of the runner's headline grid) and, for the model
  check, its entry in :data:`benchmarks.static.model.OP_MODELS`;
* a new model: one line in :data:`benchmarks.train_step.MODELS`.
"""
