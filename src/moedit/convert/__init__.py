"""Dense → MoE conversion ("upcycling") by the Three Laws (docs/CONVERT.md, docs/ROUTING_MATH.md §6).

    dense.py     the conversion of a dense DiT's weights into an MoE DiT's, and its verification
    keys.py      the table-driven key map (refuses unmapped or misshapen keys)
    exact.py     which configurations reproduce the dense model exactly, and why the others cannot
    sources.py   reading a dense moedit run or a facebookresearch/DiT checkpoint
    workflow.py  `convert_run`: output config, conversion, verification, the new run directory (atomic)

An application-layer package: it builds models and writes checkpoints, so `moe/` (the MoE layer) never
imports it.
"""
