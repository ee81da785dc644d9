/*
 * table.c - the kernel table of one ISA level. Compiled once per level, with the same FO_ISA
 * and flags as the kernel files it lists; dispatch.c picks one table at run time.
 */
#include "fo_internal.h"

#define FO_STR_(x) #x
#define FO_STR(x) FO_STR_(x)
#define FO_K(name, sfx) FO_CAT3(fo_##name, sfx, FO_ISA)
#define FO_DECLARE(name)                                                              \
    void FO_K(name, f32)(const void *, const fo_tensor *, int64_t, int64_t);          \
    void FO_K(name, f64)(const void *, const fo_tensor *, int64_t, int64_t);

FO_DECLARE(sgd)
FO_DECLARE(adagrad)
FO_DECLARE(rmsprop)
FO_DECLARE(adam)
FO_DECLARE(average)
FO_DECLARE(adadelta)
FO_DECLARE(adamax)
FO_DECLARE(nadam)
FO_DECLARE(radam)
FO_DECLARE(asgd)
FO_DECLARE(rprop)
FO_DECLARE(lion)
FO_DECLARE(sparse_adam)

#define FO_PAIR(name) FO_K(name, f32), FO_K(name, f64)

const fo_kernel_table FO_CAT3(fo, table, FO_ISA) = {
    FO_STR(FO_ISA),
    FO_PAIR(sgd),
    FO_PAIR(adagrad),
    FO_PAIR(rmsprop),
    FO_PAIR(adam),
    FO_PAIR(average),
    FO_PAIR(adadelta),
    FO_PAIR(adamax),
    FO_PAIR(nadam),
    FO_PAIR(radam),
    FO_PAIR(asgd),
    FO_PAIR(rprop),
    FO_PAIR(lion),
    FO_PAIR(sparse_adam),
};
