"""The cost of a step as a function of the number of parameter tensors (fastopt, fastopt.torch,
torch.optim's three paths, DeepSpeed's CPU Adam when installed): see
``fastopt._cli.tensor_count``, which ``python -m fastopt bench --tensor-count`` runs too.

    python benchmarks/bench_tensor_count.py [--counts 1,10,100,1000,10000] [--elements 1,1000]
                                            [--rounds 5] [--optimizer Adam] [--json FILE]
"""
from fastopt._cli.tensor_count import main

if __name__ == "__main__":
    main()
