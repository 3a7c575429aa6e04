// fault.cu: kernels that fail on purpose, for the GPU fault tests only.
//
// What it computes
//   fault_trap           stops the kernel with a trap instruction (the driver then reports
//                        CUDA_ERROR_LAUNCH_FAILED, or CUDA_ERROR_ILLEGAL_INSTRUCTION)
//   fault_write_through  writes through the pointer it is given; launched with a null
//                        pointer, an illegal address (CUDA_ERROR_ILLEGAL_ADDRESS)
//
// Launch contract
//   One block of one thread; fault_write_through takes one pointer argument.
//
// Why this design
//   A merge must end with the failing step named and its partial output removed when the
//   GPU faults. These kernels make that fault on demand: they are launched only by the test
//   hook REGMEAN_TEST_GPU_FAULT (src/backend/cuda/fault.rs), never by a merge itself.

extern "C" __global__ void fault_trap() { __trap(); }

extern "C" __global__ void fault_write_through(int *p) { *(volatile int *)p = 1; }
