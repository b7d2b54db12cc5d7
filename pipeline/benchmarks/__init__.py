"""The benchmark harnesses: what ``afmrec bench`` measures, beside the product's stages.

* :mod:`.quality`: AUC of every compressed variant against the original, paired by seed.
* :mod:`.speed`: training, statistics, compression and served-inference speed at the
  MLPerf DLRMv2 shape, each against its baseline in one run.
* :mod:`.stats_pass`: the statistics pass against a forward-only pass on a user's model.

Their command lines are ``afmrec.launch.bench_*``.
"""
