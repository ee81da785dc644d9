"""Checks of 0-d scalar state (NAdam's mu_product, ASGD's eta and mu) before a step."""
import numpy as np


def check_scalar_state(opt, keys):
    """Raise before any update if a parameter about to step has unusable scalar state."""
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            st = opt.state.get(p)
            if not st or getattr(p, "grad", None) is None:
                continue
            for key in keys:
                value = st.get(key)
                if not (isinstance(value, np.ndarray) and value.dtype == np.float32
                        and value.size == 1 and value.flags.writeable
                        and value.flags.c_contiguous):
                    raise TypeError(f"param_groups[{gi}]['params'][{pi}]: state[{key!r}] "
                                    f"must be a writable 0-d float32 array, got {value!r}")


__all__ = ["check_scalar_state"]
