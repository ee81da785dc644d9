/*
 * table.c - the kernel table of one ISA level: a pointer to every kernel's entry, indexed by
 * its FO_KERNEL_* id. Compiled once per level with the same FO_ISA as the kernel files;
 * dispatch.c picks one table at run time.
 */
#include "fo_internal.h"

#define FO_KERNEL(name) extern const fo_kernel FO_CAT3(fo_kernel, name, FO_ISA);
#include "kernels.def"
#undef FO_KERNEL

const fo_kernel *const FO_CAT3(fo, table, FO_ISA)[FO_KERNEL_COUNT] = {
#define FO_KERNEL(name) &FO_CAT3(fo_kernel, name, FO_ISA),
#include "kernels.def"
#undef FO_KERNEL
};
