// Critic-free advantages (group_advantages) on CUDA: the launcher `CudaGroupAdv` of
// rlhf/group_advantages_op.h (which checks, converts and allocates); the math is rlhf/group_advantages.h.
//
// ---- Positions, segments, parts ----
// The kernel walks B "positions". With group_size G, position k is sequence k and a segment
// (group) starts where k % G == 0. With group_index, position k is the k-th entry of the ids
// sorted by (id, index): sequence perm[k], and a segment starts where the sorted id changes; the
// sort is by (id, index), a total order, so the positions and every sum below are the same on
// every run. Parts of kPart = 4096 consecutive positions, one block each (512 threads x 8).
// A segment belongs to the part holding its start:
//   inner segments (start and end in the part) go through one block-wide segmented scan: the
//     scan element is a run's statistics (n, mean, m2) cut at segment starts, combined with
//     Chan's merge; a fixed tree (serial over a thread's 8 positions, shuffles over lanes, one
//     warp over the 16 warp totals), so the result is bitwise fixed. The last position of each
//     segment holds its statistics and leaves them in shared memory at slot start/2 (two
//     segments of two or more members cannot share a slot; a group of one needs none);
//   the segment running past the part's end, if it starts in the part, is reduced by the whole
//     block, reading beyond the part (a strided per-thread merge, then a fixed block tree);
//   positions before the part's first start belong to an earlier part's segment: skipped.
// So one block owns each group whatever its length; a group longer than a part keeps one block
// busy for it while the others are idle (a degenerate batch, still correct).
//
// ---- Launches ----
// group_size: ONE launch. grpo, dr_grpo and rloo need no communication between blocks: a plain
// launch of ceil(B / 4096) blocks (one block for B <= 4096, the RLHF batch).
// reinforce++ needs the batch statistics of x = r - group mean: each part's are merged (Chan) in
// part order, by every block alike, after a grid barrier, then every part is processed again
// (recomputed, same bits) and written. One block (B <= 4096): no barrier, one plain launch;
// more: one cooperative launch (grid = min(parts, co-resident blocks), blocks loop over parts).
// The parts depend on B only, never on the grid: the same bits on every GPU.
// group_index, B <= 4096: ONE launch. Block 0 sorts the (id, index) pairs in shared memory
// (bitonic network), writes them to a scratch tensor, and proceeds as above.
// group_index, B > 4096: torch's stable sort of the ids (at::sort: a cub radix sort over 64-bit
// keys, about ten launches, no host sync) gives the sorted ids and perm; then ONE launch as above.
// mask: the [B, T] expansion runs in the same launch after a grid barrier: a cooperative grid of
// min(max(parts, B*T / 8192), co-resident) blocks (a plain one-block launch when that is 1);
// blocks without a part only expand.
// Every barrier is grid.sync() of a cooperative launch, which CUDA graphs capture (a kernel node
// with the cooperative attribute); no atomics, no host reads, no memset.
//
// Status: compiled for sm_80 and sm_90 (112-120 registers, no spills, 41.9 KB static shared
// memory); the device code (this file up to the launcher) was run on a CPU emulator (each CUDA
// thread a fiber; __syncthreads, shuffles and grid.sync as fiber barriers, a barrier not reached
// by every thread reported) against the float64 reference: every path above, 83 cases. Not yet
// run on a GPU: the cuda-marked tests in tests/test_group_advantages.py are the check.
// Only light ATen/c10 headers here: torch/extension.h would cost minutes of nvcc time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>

#include "rlhf/group_advantages.h"
#include "rlhf/group_advantages_op.h"

namespace rlhf {
namespace {

constexpr int kThreads = 512, kItems = 8, kPart = kThreads * kItems, kWarps = kThreads / 32;
constexpr int kExpandPerThread = 16;  // mask elements per thread and grid pass: sizes the expansion grid
constexpr unsigned kAll = 0xffffffffu;

// ---- the segmented scan ----

// Statistics of a run of consecutive positions, cut at the latest segment start in it: `start`
// is that start's offset in the part (s covers [start, end of run]), or -1 (none: s covers the
// whole run, which continues a segment started before it).
struct Run {
  GroupStat s;
  int start;
};

__device__ __forceinline__ Run no_run() { return {{0.0, 0.0, 0.0}, -1}; }

// a then b (b later): a segment start in b discards a.
__device__ __forceinline__ Run run_then(const Run& a, const Run& b) {
  return b.start >= 0 ? b : Run{merge_stat(a.s, b.s), a.start};
}

__device__ __forceinline__ Run shfl_up_run(const Run& x, int d) {
  return {{__shfl_up_sync(kAll, x.s.n, d), __shfl_up_sync(kAll, x.s.mean, d), __shfl_up_sync(kAll, x.s.m2, d)},
          __shfl_up_sync(kAll, x.start, d)};
}

__device__ __forceinline__ GroupStat shfl_down_stat(const GroupStat& x, int d) {
  return {__shfl_down_sync(kAll, x.n, d), __shfl_down_sync(kAll, x.mean, d), __shfl_down_sync(kAll, x.m2, d)};
}

struct Shared {
  union {
    struct {                   // the in-kernel sort (group_index, B <= kPart)
      int64_t key[kPart];
      uint16_t idx[kPart];
    } sort;
    struct {                   // inner segments' statistics, at slot start / 2 (n >= 2 only)
      double mean[kPart / 2], m2[kPart / 2];
      uint16_t n[kPart / 2];
    } slot;
  } u;
  Run warp_run[kWarps];        // the warps' inclusive runs, then their carries
  GroupStat stat[kWarps + 1];  // block merges
  int64_t word[2];             // block broadcasts
};

// The run of every position before mine in the part (thread t holds positions 8t .. 8t+7):
// `mine` is the combination of my positions.
__device__ Run block_carry_in(const Run& mine, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Run incl = mine;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const Run o = shfl_up_run(incl, d);
    if (lane >= d) incl = run_then(o, incl);
  }
  Run excl = shfl_up_run(incl, 1);
  if (lane == 0) excl = no_run();
  if (lane == 31) sh.warp_run[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    Run w = lane < kWarps ? sh.warp_run[lane] : no_run();
#pragma unroll
    for (int d = 1; d < kWarps; d <<= 1) {
      const Run o = shfl_up_run(w, d);
      if (lane >= d) w = run_then(o, w);
    }
    Run wex = shfl_up_run(w, 1);
    if (lane == 0) wex = no_run();
    if (lane < kWarps) sh.warp_run[lane] = wex;  // every lane read its entry before the shuffles
  }
  __syncthreads();
  const Run carry = run_then(sh.warp_run[warp], excl);
  __syncthreads();  // warp_run is reused by the next scan
  return carry;
}

// A fixed tree over the block: lanes (shuffles), then warps in order. Every thread gets the result.
__device__ GroupStat block_merge(GroupStat s, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) s = merge_stat(s, shfl_down_stat(s, d));
  if (lane == 0) sh.stat[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    GroupStat t = sh.stat[0];
    for (int w = 1; w < kWarps; ++w) t = merge_stat(t, sh.stat[w]);
    sh.stat[kWarps] = t;
  }
  __syncthreads();
  const GroupStat r = sh.stat[kWarps];
  __syncthreads();  // stat is reused
  return r;
}

__device__ int64_t block_min(int64_t v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v = min(v, static_cast<int64_t>(__shfl_down_sync(kAll, v, d)));
  if (lane == 0) reinterpret_cast<int64_t*>(sh.stat)[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t t = v;
    for (int w = 1; w < kWarps; ++w) t = min(t, reinterpret_cast<int64_t*>(sh.stat)[w]);
    sh.word[1] = t;
  }
  __syncthreads();
  const int64_t r = sh.word[1];
  __syncthreads();
  return r;
}

// ---- sources of positions ----

// group_size: position k is sequence k. vec: rewards aligned for float4.
struct Consecutive {
  const float* r;
  int64_t B, G;
  bool vec;

  __device__ bool head(int64_t k) const { return k % G == 0; }
  __device__ float reward(int64_t k) const { return __ldg(r + k); }
  __device__ int64_t seq(int64_t k) const { return k; }
  __device__ int64_t segment_end(int64_t start, int64_t, Shared&) const { return start + G; }

  // Rewards of positions k0 .. k0+7 (those < p1) and the segment starts among k0 .. k0+8 (bit i).
  __device__ unsigned load(int64_t k0, int64_t p1, float* x) const {
    if (vec && k0 + kItems <= p1) {
      const float4* p = reinterpret_cast<const float4*>(r + k0);
      const float4 a = __ldg(p), b = __ldg(p + 1);
      x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) x[i] = k0 + i < p1 ? __ldg(r + k0 + i) : 0.f;
    }
    unsigned heads = 0;
    int64_t m = k0 % G;
#pragma unroll
    for (int i = 0; i <= kItems; ++i) {
      heads |= m == 0 ? 1u << i : 0u;
      m = m + 1 == G ? 0 : m + 1;
    }
    return heads;
  }
};

// group_index: position k is sequence perm[k], keys[k] its id, keys sorted (by id, then index).
// Plain loads: with the in-kernel sort, keys and perm were written by this kernel.
struct Sorted {
  const float* r;
  const int64_t *keys, *perm;
  int64_t B;

  __device__ bool head(int64_t k) const { return k == 0 || keys[k] != keys[k - 1]; }
  __device__ float reward(int64_t k) const { return r[perm[k]]; }
  __device__ int64_t seq(int64_t k) const { return perm[k]; }

  // The end of the segment holding positions start .. from-1 (from: not a segment start):
  // the first start after `from`, or B; the whole block looks at kPart positions per round.
  __device__ int64_t segment_end(int64_t, int64_t from, Shared& sh) const {
    for (int64_t q = from;; q += kPart) {
      int64_t found = LLONG_MAX;
      for (int i = 0; i < kItems; ++i) {
        const int64_t k = q + static_cast<int64_t>(threadIdx.x) * kItems + i;
        if (k >= B || head(k)) {
          found = min(k, B);
          break;
        }
      }
      found = block_min(found, sh);
      if (found != LLONG_MAX) return found;
    }
  }

  __device__ unsigned load(int64_t k0, int64_t p1, float* x) const {
    unsigned heads = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const bool ok = k0 + i < p1;
      x[i] = ok ? r[perm[k0 + i]] : 0.f;
      heads |= ok && head(k0 + i) ? 1u << i : 0u;
    }
    return heads | (k0 + kItems < B && head(k0 + kItems) ? 1u << kItems : 0u);
  }
};

// ---- one part ----

// Calls on(k, r, g) for every position k of the part's inner segments (g: its segment's
// statistics). Returns the start of the part's outer segment (the one running past the part's
// end), or -1. Block-wide: every thread calls it.
template <typename Src, typename F>
__device__ int64_t inner_segments(const Src& src, int64_t B, int64_t p, Shared& sh, F&& on) {
  const int64_t p0 = p * kPart, p1 = min(B, p0 + kPart), k0 = p0 + static_cast<int64_t>(threadIdx.x) * kItems;
  float x[kItems];
  const unsigned heads = src.load(k0, p1, x);
  const bool ext = p1 < B && !src.head(p1);  // the segment at the part's end runs past it
  const int off0 = static_cast<int>(k0 - p0);

  Run mine = no_run();
#pragma unroll
  for (int i = 0; i < kItems; ++i)
    if (k0 + i < p1) mine = run_then(mine, {{1.0, static_cast<double>(x[i]), 0.0}, (heads >> i) & 1u ? off0 + i : -1});
  Run acc = block_carry_in(mine, sh);

  int start[kItems];
  unsigned last = 0;  // bit i: position k0+i ends an inner segment (or precedes the part's first start)
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    start[i] = -1;
    const int64_t k = k0 + i;
    if (k >= p1) continue;
    acc = run_then(acc, {{1.0, static_cast<double>(x[i]), 0.0}, (heads >> i) & 1u ? off0 + i : -1});
    start[i] = acc.start;
    if (((heads >> (i + 1)) & 1u) || (k + 1 == p1 && !ext)) {
      last |= 1u << i;
      if (acc.start >= 0 && acc.s.n >= 2) {
        const int slot = acc.start >> 1;
        sh.u.slot.mean[slot] = acc.s.mean;
        sh.u.slot.m2[slot] = acc.s.m2;
        sh.u.slot.n[slot] = static_cast<uint16_t>(acc.s.n);
      }
    }
    if (k + 1 == p1) sh.word[0] = ext && acc.start >= 0 ? p0 + acc.start : -1;
  }
  __syncthreads();
  const int64_t outer = sh.word[0];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (start[i] < 0 || (outer >= 0 && p0 + start[i] == outer)) continue;  // earlier part's, or outer
    const bool single = ((heads >> i) & 1u) && ((last >> i) & 1u);
    const int slot = start[i] >> 1;
    const GroupStat g = single ? GroupStat{1.0, static_cast<double>(x[i]), 0.0}
                               : GroupStat{static_cast<double>(sh.u.slot.n[slot]), sh.u.slot.mean[slot],
                                           sh.u.slot.m2[slot]};
    on(k0 + i, x[i], g);
  }
  __syncthreads();  // slots and word[0] are reused
  return outer;
}

// Calls on(k, r, g) for every position of the segment [start, end) (g: its statistics). Block-wide.
template <typename Src, typename F>
__device__ void outer_segment(const Src& src, int64_t start, int64_t end, Shared& sh, F&& on) {
  GroupStat t = {0.0, 0.0, 0.0};
  for (int64_t k = start + threadIdx.x; k < end; k += kThreads)
    t = merge_stat(t, {1.0, static_cast<double>(src.reward(k)), 0.0});
  const GroupStat g = block_merge(t, sh);
  for (int64_t k = start + threadIdx.x; k < end; k += kThreads) on(k, src.reward(k), g);
}

// Every segment owned by part p: on(k, r, g) for each of their positions.
template <typename Src, typename F>
__device__ void part_segments(const Src& src, int64_t B, int64_t p, Shared& sh, F&& on) {
  const int64_t outer = inner_segments(src, B, p, sh, on);
  if (outer >= 0) {
    const int64_t p1 = min(B, (p + 1) * kPart);
    outer_segment(src, outer, src.segment_end(outer, p1, sh), sh, on);
  }
}

// ---- the kernel ----

struct Launch {
  int64_t parts;           // ceil(B / kPart)
  bool coop;               // launched cooperatively (grid barriers); else the grid never needs one
  GroupStat* part_stats;   // [parts]: reinforce++'s per-part statistics of x, when parts > 1
  int64_t* sort_out;       // [2, B] (sorted ids, perm) written by the in-kernel sort, or nullptr
  bool vec_expand;         // T % 4 == 0 and mask, token_adv aligned for 4-wide access
};

__device__ __forceinline__ void grid_barrier(bool coop) {
  if (coop) cooperative_groups::this_grid().sync();  // also orders global memory across the grid
  else __syncthreads();                              // a grid of one block
}

// Block 0: the (id, index) pairs of ids [B] (B <= kPart) sorted in shared memory by a bitonic
// network (pairs are distinct: a total order, so one result), written to out [2, B].
__device__ void sort_pairs(const int64_t* ids, int64_t B, Shared& sh, int64_t* out) {
  int n = 2;
  while (n < B) n <<= 1;
  int64_t* key = sh.u.sort.key;
  uint16_t* idx = sh.u.sort.idx;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    key[i] = i < B ? ids[i] : LLONG_MAX;  // padding sorts last: its index is >= B
    idx[i] = static_cast<uint16_t>(i);
  }
  __syncthreads();
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < n / 2; t += kThreads) {
        const int lo = 2 * t - (t & (stride - 1)), hi = lo + stride;
        const int64_t kl = key[lo], kh = key[hi];
        const uint16_t il = idx[lo], ih = idx[hi];
        const bool greater = kl > kh || (kl == kh && il > ih);
        if (greater == ((lo & size) == 0)) {
          key[lo] = kh;
          key[hi] = kl;
          idx[lo] = ih;
          idx[hi] = il;
        }
      }
      __syncthreads();
    }
  }
  for (int k = threadIdx.x; k < B; k += kThreads) {
    out[k] = key[k];
    out[B + k] = idx[k];
  }
  __syncthreads();
}

// a: the op's arrays (rlhf/group_advantages_op.h); src: the positions (Consecutive or Sorted;
// with L.sort_out, Sorted reads the arrays block 0 sorts first); L: the launch's layout.
template <typename Src>
__global__ void __launch_bounds__(kThreads) group_adv_kernel(const GroupAdvArgs a, const Src src, const Launch L) {
  __shared__ Shared sh;
  if (L.sort_out != nullptr && blockIdx.x == 0) sort_pairs(a.group_index, a.B, sh, L.sort_out);
  const int mode = a.mode;
  const double eps = a.eps;
  const AdvAffine no_batch = {0.0, 1.0};

  if (mode != kReinforcePP) {
    for (int64_t p = blockIdx.x; p < L.parts; p += gridDim.x)
      part_segments(src, a.B, p, sh, [&](int64_t k, float r, const GroupStat& g) {
        a.adv[src.seq(k)] = static_cast<float>(member_advantage(mode, r, g, no_batch, eps));
      });
  } else {
    // 1. each part's statistics of x = r - group mean over the batch's members
    GroupStat mine = {0.0, 0.0, 0.0};
    for (int64_t p = blockIdx.x; p < L.parts; p += gridDim.x) {
      GroupStat part = {0.0, 0.0, 0.0};
      part_segments(src, a.B, p, sh, [&](int64_t, float r, const GroupStat& g) {
        if (in_batch(g)) part = merge_stat(part, {1.0, static_cast<double>(r) - g.mean, 0.0});
      });
      part = block_merge(part, sh);
      if (L.parts == 1) mine = part;
      else if (threadIdx.x == 0) L.part_stats[p] = part;
    }
    // 2. the batch statistics: every part, in part order, in every block alike
    if (L.parts > 1) {
      grid_barrier(L.coop);
      GroupStat t = {0.0, 0.0, 0.0};
      for (int64_t p = threadIdx.x; p < L.parts; p += kThreads) {
        const GroupStat* q = L.part_stats + p;
        t = merge_stat(t, {__ldcg(&q->n), __ldcg(&q->mean), __ldcg(&q->m2)});
      }
      mine = block_merge(t, sh);
    }
    const AdvAffine batch = batch_affine(mine, eps);
    // 3. every part again (the same statistics, bit for bit), written
    for (int64_t p = blockIdx.x; p < L.parts; p += gridDim.x)
      part_segments(src, a.B, p, sh, [&](int64_t k, float r, const GroupStat& g) {
        a.adv[src.seq(k)] = static_cast<float>(member_advantage(mode, r, g, batch, eps));
      });
  }

  if (a.token_adv == nullptr) return;
  grid_barrier(L.coop);
  const int64_t n = a.B * a.T, stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (L.vec_expand) {  // 4 tokens of one row at a time
    for (int64_t i = first * 4; i < n; i += stride * 4) {
      const float v = __ldcg(a.adv + i / a.T);
      const uchar4 m = *reinterpret_cast<const uchar4*>(a.mask + i);
      *reinterpret_cast<float4*>(a.token_adv + i) = make_float4(m.x ? v : 0.f, m.y ? v : 0.f, m.z ? v : 0.f,
                                                                m.w ? v : 0.f);
    }
  } else {
    for (int64_t i = first; i < n; i += stride) a.token_adv[i] = a.mask[i] ? __ldcg(a.adv + i / a.T) : 0.f;
  }
}

// Co-resident blocks of `kernel` on device `dev`, cached per kernel (no sync: attribute queries).
template <typename Src>
int max_blocks(int dev) {
  static std::atomic<int> cache[64];
  const int cached = dev < 64 ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (cached > 0) return cached;
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, group_adv_kernel<Src>, kThreads, 0));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int blocks = std::max(1, per_sm * sms);
  if (dev < 64) cache[dev].store(blocks, std::memory_order_relaxed);
  return blocks;
}

bool aligned(const void* p, uintptr_t to) { return reinterpret_cast<uintptr_t>(p) % to == 0; }

template <typename Src>
void launch(const GroupAdvArgs& a, const Src& src, Launch L, const at::Tensor& like) {
  const bool rpp = a.mode == kReinforcePP, expand = a.token_adv != nullptr && a.T > 0;
  const int64_t per_block = static_cast<int64_t>(kThreads) * kExpandPerThread;
  const int64_t expand_blocks = expand ? (a.B * a.T + per_block - 1) / per_block : 0;
  const int64_t blocks = std::max(L.parts, expand_blocks);
  L.coop = blocks > 1 && ((rpp && L.parts > 1) || expand);
  const int64_t grid = L.coop ? std::min<int64_t>(blocks, max_blocks<Src>(like.device().index())) : blocks;
  TORCH_CHECK_VALUE(grid <= INT_MAX, "group_advantages: too many sequences for one launch: B=", a.B);
  at::Tensor part_stats;
  if (rpp && L.parts > 1) {
    part_stats = at::empty({L.parts * 3}, like.options().dtype(at::kDouble));
    L.part_stats = reinterpret_cast<GroupStat*>(part_stats.data_ptr<double>());
  }
  L.vec_expand = expand && a.T % 4 == 0 && aligned(a.mask, 4) && aligned(a.token_adv, 16);
  auto stream = c10::cuda::getCurrentCUDAStream();
  GroupAdvArgs args = a;
  if (!L.coop) {
    group_adv_kernel<Src><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(args, src, L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  Src s = src;
  void* params[] = {&args, &s, &L};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&group_adv_kernel<Src>),
                                             dim3(static_cast<unsigned>(grid)), dim3(kThreads), params, 0, stream));
}

// The device launcher of rlhf/group_advantages_op.h.
struct CudaGroupAdv {
  static void group_advantages(const GroupAdvArgs& a, const at::Tensor& like, const at::Tensor& group_index) {
    const c10::cuda::CUDAGuard guard(like.device());
    Launch L = {(a.B + kPart - 1) / kPart, false, nullptr, nullptr, false};
    if (a.group_index == nullptr) {
      launch(a, Consecutive{a.rewards, a.B, a.group_size, aligned(a.rewards, 16)}, L, like);
      return;
    }
    if (a.B <= kPart) {  // sorted in the kernel, into one scratch tensor
      at::Tensor sorted = at::empty({2 * a.B}, like.options().dtype(at::kLong));
      L.sort_out = sorted.data_ptr<int64_t>();
      launch(a, Sorted{a.rewards, L.sort_out, L.sort_out + a.B, a.B}, L, like);
      return;
    }
    const auto [keys, perm] = at::sort(group_index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    launch(a, Sorted{a.rewards, keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), a.B}, L, like);
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("group_advantages", &rlhf::group_advantages_forward<rlhf::CudaGroupAdv>);
  m.impl("group_advantages_masked", &rlhf::group_advantages_masked_forward<rlhf::CudaGroupAdv>);
}
