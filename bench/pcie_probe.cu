// 16-byte loads, optionally with a 256-byte L2 prefetch hint
template <bool HINT>
__device__ __forceinline__ uint4 load16(const uint4* p) {
  uint4 v;
  if (HINT)
    asm volatile("ld.global.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  else
    v = *p;
  return v;
}
// one CUDA block copies one `ch`-byte chunk, 8 loads in flight per thread before the stores
template <bool HINT>
__device__ void chunk_copy(const char* src, char* dst, long ch) {
  const uint4* s = (const uint4*)(src + blockIdx.x * ch);
  uint4* d = (uint4*)(dst + blockIdx.x * ch);
  int nw = ch / 16;
  for (int base = threadIdx.x; base < nw; base += blockDim.x * 8) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; u++) { int w = base + u * blockDim.x; if (w < nw) v[u] = load16<HINT>(s + w); }
#pragma unroll
    for (int u = 0; u < 8; u++) { int w = base + u * blockDim.x; if (w < nw) d[w] = v[u]; }
  }
}
extern "C" __global__ void blk16(const char* src, char* dst, long ch) { chunk_copy<false>(src, dst, ch); }
extern "C" __global__ void blk16_l2(const char* src, char* dst, long ch) { chunk_copy<true>(src, dst, ch); }
__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void bulk_load(void* sm, const void* g, unsigned bytes, unsigned long long* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(smem_u32(sm)), "l"(g), "r"(bytes), "r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void wait_bar(unsigned long long* bar, unsigned parity) {
  unsigned done = 0;
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0,1,0,p; }"
                 : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
}
// thread 0: one mbarrier expecting `ch` bytes, and bulk loads of `ch` bytes from global memory in pieces
__device__ __forceinline__ void load_all(char* buf, const char* s, long ch, int piece, unsigned long long* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_u32(bar)));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               :: "r"(smem_u32(bar)), "r"((unsigned)ch) : "memory");
  for (long off = 0; off < ch; off += piece)
    bulk_load(buf + off, s + off, (unsigned)min((long)piece, ch - off), bar);
}
// thread 0: bulk stores of `ch` bytes from shared to global memory in pieces, waited for
__device__ __forceinline__ void store_all(char* d, char* buf, long ch, int piece) {
  for (long off = 0; off < ch; off += piece)
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                 :: "l"(d + off), "r"(smem_u32(buf + off)), "r"((unsigned)min((long)piece, ch - off)) : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
// pure TMA: one CUDA block moves `ch` bytes (<= SM_BYTES) in pieces of `piece` through shared memory
extern "C" __global__ void tma(const char* src, char* dst, long ch, int piece) {
  extern __shared__ __align__(128) char buf[];
  __shared__ __align__(8) unsigned long long bar;
  const char* s = src + blockIdx.x * ch;
  char* d = dst + blockIdx.x * ch;
  if (threadIdx.x == 0) {
    load_all(buf, s, ch, piece, &bar);
    wait_bar(&bar, 0);
    store_all(d, buf, ch, piece);
  }
}
// TMA load into shared memory, SM 16-byte stores out (H2D shape of a scatter with checksum)
extern "C" __global__ void tma_ld_sm_st(const char* src, char* dst, long ch, int piece) {
  extern __shared__ __align__(128) char buf[];
  __shared__ __align__(8) unsigned long long bar;
  const char* s = src + blockIdx.x * ch;
  char* d = dst + blockIdx.x * ch;
  if (threadIdx.x == 0) load_all(buf, s, ch, piece, &bar);
  __syncthreads();
  wait_bar(&bar, 0);
  const uint4* b = (const uint4*)buf;
  uint4* o = (uint4*)d;
  for (int w = threadIdx.x; w < ch / 16; w += blockDim.x) o[w] = b[w];
}
// SM 16-byte loads into shared memory, TMA store out (D2H shape of a gather with checksum)
extern "C" __global__ void sm_ld_tma_st(const char* src, char* dst, long ch, int piece) {
  extern __shared__ __align__(128) char buf[];
  const uint4* s = (const uint4*)(src + blockIdx.x * ch);
  char* d = dst + blockIdx.x * ch;
  uint4* b = (uint4*)buf;
  for (int w = threadIdx.x; w < ch / 16; w += blockDim.x) b[w] = s[w];
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  if (threadIdx.x == 0) store_all(d, buf, ch, piece);
}
