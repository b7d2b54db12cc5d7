"""The benchmark harnesses: what ``afmrec bench`` measures, beside the product's stages.

* :mod:`.quality`: AUC of every compressed variant against the original, paired by seed.

The speed and statistics benchmarks are :mod:`afmrec.pipeline.speed` and
:mod:`afmrec.pipeline.bench`; their command lines are ``afmrec.launch.bench_*``.
"""
