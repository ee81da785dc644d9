"""Data-parallel Adam steps over MPI (fastopt.distributed): per-rank optimizer state and step
time, communication and update apart, for plain data parallelism and ZeroOptimizer on 1, 2
and 3 ranks: see ``fastopt._cli.distributed``, which ``python -m fastopt bench
--distributed`` runs too.

    python benchmarks/bench_distributed_mpi.py [--sizes 1e6,1e7] [--ranks 1,2,3] [--repeats 7]
                                               [--bucket-bytes 26214400] [--json FILE]
"""
from fastopt._cli.distributed import main

if __name__ == "__main__":
    main()
