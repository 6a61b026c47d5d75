"""Measuring library of ``tools/analysis_tools/benchmark_backbones.py``.

- :mod:`~agent_mm.benchmark.models`: the benchmarked backbones (agent
  models, their reference-path twins and mmdet baselines), input sizes and
  precisions (float32, or autocast to bfloat16 / float16);
- :mod:`~agent_mm.benchmark.measure`: latency, peak memory, bias cache and
  FLOPs of the models at one input size;
- :mod:`~agent_mm.benchmark.targets`: the project's acceptance targets
  (ratios of one run and their bounds) and the FLOP check of the two
  attention paths;
- :mod:`~agent_mm.benchmark.report`: the markdown tables, the JSON file and
  the latency plot;
- :mod:`~agent_mm.benchmark.run`: a whole run, from its settings to the
  results dict the report is made from;
- :mod:`~agent_mm.benchmark.profile`: the library of
  ``tools/analysis_tools/profile_backbones.py``: self CPU time of eval
  forwards by op family, against each family's floor (FLOPs at the matmul
  rate, bytes at the copy bandwidth, both measured in the same run);
- :mod:`~agent_mm.benchmark.ops_alone`: every op of a forward timed in it
  and re-run alone (``profile_backbones.py --alone``);
- :mod:`~agent_mm.benchmark.attention_calls`: the agent attentions a
  forward calls, with their token grids;
- :mod:`~agent_mm.benchmark.cli`: command-line pieces shared by the
  tools.
"""
