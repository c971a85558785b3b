// GAE, packed GAE and masked whitening on CUDA: the launchers `CudaGae` of rlhf/gae_op.h
// (which checks, converts and allocates).
//
// ---- GAE: one segmented reverse scan over all N steps, in one kernel ----
// The state carried backwards in time is s = (A, V): A = advantage of the next unmasked step
// of the row, V = its value (or last_value). Step t maps s to
//   valid t:   A' = (r_t - v_t) + gamma*V + gamma*lam*A,  V' = v_t       (rlhf/gae.h)
//   masked t:  s' = s                (skipped: no TD error, the chain goes on)
// and the last step of a row first resets s := (0, last_value[row]). Any composition of these
// maps is one of three kinds (struct Map):
//   pass:   s' = s                                 (no valid step, no row end)
//   affine: A' = a*A + b + c*V,  V' = q            (k >= 1 valid steps, no row end:
//           a = (gamma*lam)^k, c = gamma*(gamma*lam)^(k-1), q = value of the EARLIEST valid step)
//   const:  s' = (b, q)                            (contains a row end: older state discarded)
// Composition E∘L (E earlier in time, applied after L): E const or L pass -> E; E pass -> L;
// else {a: Ea*La, b: Ea*Lb + Ec*Lq + Eb, c: Ea*Lc, q: Eq, const iff L const (then La=Lc=0)}.
// V is a selection, never a sum: it is exact in float. Row ends are `const` steps, so the
// padded rows and packed sequences are simply segments of one scan over the [N] array; no map
// reads across a row end (a const map ignores its input: no 0*NaN), so NaN/inf stays in its row.
//
// Tiles: kTile = 2048 consecutive steps (256 threads x 8: two float4 loads per input, tiles
// aligned to 2048 elements), so 128x4096 and 16x32768 make 256 blocks (2 per SM of an H100/H200,
// all co-resident at <= 128 registers) and 64x4096 makes 128, with short per-thread serial work.
// Each block draws a ticket k from an atomic counter and takes tile nt-1-k: tickets run from
// the END of the array, the order the recurrence needs. In a tile, each thread composes its 8
// maps serially; a fixed-tree block scan (shuffles, then one warp over the 8 warp totals) gives
// each thread the map of all later steps of the tile, and the tile's aggregate M_k.
//
// Look-back, deterministic: S_k = state before tile k = M_k(S_{k-1}); S_{-1} = (0, 0) never
// matters (the last step of the array ends a row). Tile k publishes M_k (flag kAgg) right after its
// scan, or S_k (flag kState) when M_k is const. Warp 0 then reads the flags of tiles k-1..k-32;
// once the nearest tile j with kState has only kAgg tiles between, S_{k-1} = M_{k-1}(..M_{j+1}(S_j))
// applying the maps ONE BY ONE to the state: that is how S is defined and apply_map() is the same
// two __fma_rn and a select wherever it runs, so S_{k-1} is bitwise the same whichever j was
// found (composing M∘M' would regroup roundings: never done across tiles). A row of <= 33 tiles
// thus resolves in one round once the aggregates are out (a row-end tile's state is out at once),
// where a chained scan would pay ~1 us of L2 latency per tile, 16 in a row of 32768.
// Forward progress: tile k waits only on tiles < k, whose tickets were drawn earlier by blocks
// already running, and which never wait on later tiles.
// Memory ordering: the publisher (thread 0) stores the payload, then the flag with
// st.release.gpu (cuda::atomic_ref, memory_order_release), ordering the payload first; a reader
// lane loads the flag with ld.acquire.gpu, then that tile's payload with __ldcg (L2, never a
// stale L1 line). Tickets need no ordering (relaxed atomicAdd).
// Scratch: per call from the caching allocator (stream ordered: concurrent streams and each
// captured graph get their own); counter and flags are zeroed by ONE cudaMemsetAsync on the
// current stream (a memset node when captured). The kernel cannot leave them reset: a flag may
// be polled by later tiles until the end of the launch, and no block knows when that is over.
//
// ---- masked_whiten: one cooperative launch ----
// Float64 (count, mean, M2) per fixed part of the input (Chan's merge of 8-step batches), the
// parts stored, grid.sync(), then every block merges ALL parts in the same fixed order (same
// bits in every block), and writes. The parts depend on n only, not on the grid, so results
// are the same on every GPU. Grid = min(parts <= 1024, co-resident blocks). Cooperative
// launches can be captured in CUDA graphs (kernel nodes carry cudaLaunchAttributeCooperative,
// "valid for graph nodes", CUDA 12+ runtime headers); tests/test_gae.py checks capture.
// Status: compiled (sm_80, sm_90, no spills) and simulated in Python (tile algebra, scans,
// look-back with random timings: matches the float64 reference, bitwise the same states); not
// yet run on a GPU: the cuda-marked tests at the end of tests/test_gae.py are the check.
// Only light ATen/c10 headers here: torch/extension.h would cost minutes of nvcc time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cuda/atomic>

#include "rlhf/gae.h"
#include "rlhf/gae_op.h"

namespace rlhf {
namespace {

constexpr int kThreads = 256, kItems = 8, kTile = kThreads * kItems, kWarps = kThreads / 32;
constexpr int kAffine = 0, kPass = 1, kConst = 2;  // Map kinds
constexpr int kEmpty = 0, kAgg = 1, kState = 2;    // tile flags
constexpr unsigned kAll = 0xffffffffu;

struct Map {
  double a, b, c;
  float q;
  int kind;
};
struct State {
  double A;  // advantage of the next unmasked step
  float V;   // its value
};
__device__ __forceinline__ Map pass_map() { return {1.0, 0.0, 0.0, 0.f, kPass}; }

// e∘l: e is earlier in time, applied to l's output.
__device__ __forceinline__ Map compose_map(const Map& e, const Map& l) {
  if (e.kind == kConst || l.kind == kPass) return e;
  if (e.kind == kPass) return l;
  return {e.a * l.a, fma(e.a, l.b, fma(e.c, static_cast<double>(l.q), e.b)), e.a * l.c, e.q, l.kind};
}

// The only way a tile state is ever computed (see "Look-back, deterministic").
__device__ __forceinline__ State apply_map(const Map& m, State s) {
  if (m.kind == kPass) return s;
  if (m.kind == kConst) return {m.b, m.q};
  return {__fma_rn(m.a, s.A, __fma_rn(m.c, static_cast<double>(s.V), m.b)), m.q};
}

__device__ __forceinline__ Map step_map(bool valid, bool end, float r, float v, float lv, double g, double gl) {
  const double d = static_cast<double>(r) - static_cast<double>(v);
  if (end) return valid ? Map{0.0, fma(g, static_cast<double>(lv), d), 0.0, v, kConst} : Map{0.0, 0.0, 0.0, lv, kConst};
  return valid ? Map{gl, d, g, v, kAffine} : pass_map();
}

template <typename F>
__device__ __forceinline__ Map shfl_map(const Map& m, F f) {
  return {f(m.a), f(m.b), f(m.c), f(m.q), f(m.kind)};
}

using DeviceFlag = cuda::atomic_ref<int, cuda::thread_scope_device>;

struct Scratch {
  int* counter;  // [1] ticket counter, zero before the launch
  int* flags;    // [tiles] kEmpty / kAgg / kState per tile (ticket order), zero before the launch
  Map* agg;      // [tiles] the tiles' aggregates M_k (valid once flags[k] >= kAgg)
  State* state;  // [tiles] S_k, the state before tile k's earliest step (valid once kState)
};

// Warp 0, all lanes: S_{k-1}, the state after tile k (see the header).
__device__ State look_back(const Scratch& sc, int64_t k, int lane) {
  for (int round = 0;; ++round) {
    const int64_t j = k - 1 - lane;
    const int f = j < 0 ? kState : DeviceFlag(sc.flags[j]).load(cuda::memory_order_acquire);
    const unsigned have = __ballot_sync(kAll, f == kState), empty = __ballot_sync(kAll, f == kEmpty);
    const int first = __ffs(have) - 1;  // nearest tile with a state; lanes below it hold kAgg
    if (have != 0 && (empty & ((1u << first) - 1u)) == 0) {
      Map m = pass_map();
      State s = {0.0, 0.f};
      if (lane < first) {
        const Map* p = sc.agg + j;
        m = {__ldcg(&p->a), __ldcg(&p->b), __ldcg(&p->c), __ldcg(&p->q), __ldcg(&p->kind)};
      }
      if (lane == first && j >= 0) s = {__ldcg(&sc.state[j].A), __ldcg(&sc.state[j].V)};
      s = {__shfl_sync(kAll, s.A, first), __shfl_sync(kAll, s.V, first)};
      for (int l = first - 1; l >= 0; --l)
        s = apply_map(shfl_map(m, [&](auto x) { return __shfl_sync(kAll, x, l); }), s);
      return s;
    }
    if (round >= 4) __nanosleep(round < 64 ? 32 : 256);
  }
}

__device__ __forceinline__ void publish(int* flag, int value) {
  DeviceFlag(*flag).store(value, cuda::memory_order_release);
}

// Rows of packed sequences: the largest r in [0, B] with r == 0 or cu[r] <= t (the row of t
// when cu_seqlens is valid; r == B: after the last row). cu is only compared, never used as an
// address, so invalid cu_seqlens give wrong rows but no out-of-bounds access.
// Whole warp, t warp-uniform: a 32-ary search, one load latency per 32x narrowing.
__device__ int64_t warp_find_row(const int64_t* cu, int64_t B, int64_t t, int lane) {
  int64_t lo = 0, hi = B + 1;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t span = hi - lo;
    const bool small = span <= 32;
    const int64_t p = small ? lo + 1 + lane : lo + span * (lane + 1) / 32;  // increasing, in (lo, hi)
    const bool le = (small ? p < hi : lane < 31) && __ldg(cu + p) <= t;
    const unsigned ball = __ballot_sync(kAll, le);
    const int h = ball ? 31 - __clz(static_cast<int>(ball)) : -1;
    const int64_t p_lo = __shfl_sync(kAll, p, h < 0 ? 0 : h), p_hi = __shfl_sync(kAll, p, h < 31 ? h + 1 : 31);
    if (small) return h < 0 ? lo : p_lo;
    lo = h < 0 ? lo : p_lo;
    hi = h < 30 ? p_hi : hi;
  }
  return lo;
}

// One thread: the same answer for t, given lo == 0 or cu[lo] <= t (galloping, then bisection).
__device__ int64_t gallop_row(const int64_t* cu, int64_t B, int64_t lo, int64_t t) {
  int64_t step = 1;
  while (lo + step <= B && __ldg(cu + lo + step) <= t) { lo += step; step *= 2; }
  int64_t hi = std::min(lo + step, B + 1);
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (__ldg(cu + mid) <= t) lo = mid; else hi = mid;
  }
  return lo;
}

// 8 floats at p + i (i: a multiple of 8) and the bits of mask there (nullptr: all set); steps
// at or past n read as 0, unset. vec: p is aligned for float4 and mask for 8-byte loads.
__device__ __forceinline__ unsigned load8(const float* p, const bool* mask, int64_t i, int64_t n, bool vec, float* x) {
  unsigned bits = 0;
  if (vec && i + 8 <= n) {
    const float4* p4 = reinterpret_cast<const float4*>(p + i);
    const float4 x0 = __ldg(p4), x1 = __ldg(p4 + 1);
    const uint2 m = mask ? __ldg(reinterpret_cast<const uint2*>(mask + i)) : make_uint2(~0u, ~0u);
    const float xx[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      x[j] = xx[j];
      bits |= (((j < 4 ? m.x : m.y) >> (8 * (j & 3))) & 0xffu) != 0 ? 1u << j : 0u;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      x[j] = i + j < n ? p[i + j] : 0.f;
      bits |= i + j < n && (mask == nullptr || mask[i + j]) ? 1u << j : 0u;
    }
  }
  return bits;
}

__device__ __forceinline__ void store8(float* p, int64_t i, int64_t n, bool vec, const float* x) {
  if (vec && i + 8 <= n) {
    reinterpret_cast<float4*>(p + i)[0] = make_float4(x[0], x[1], x[2], x[3]);
    reinterpret_cast<float4*>(p + i)[1] = make_float4(x[4], x[5], x[6], x[7]);
  } else {
    for (int j = 0; j < 8 && i + j < n; ++j) p[i + j] = x[j];
  }
}

struct Steps {  // one thread's kItems = 8 consecutive steps t0 .. t0+7 (bit i of the masks: t0+i)
  float r[kItems], v[kItems];  // rewards and values; overwritten by advantages and returns
  float lv[kItems];            // at a row's last step: last_values[row] (or 0)
  unsigned valid, end;         // unmasked and inside a row / last step of its row
};

// Row ends and their last values (all lanes of the warp call this: the packed search is
// warp-wide). Packed steps outside every row (invalid cu_seqlens only) are skipped, 0 out.
__device__ __forceinline__ void find_row_ends(const GaeArgs& a, int64_t t0, int lane, Steps& s) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) s.lv[i] = 0.f;
  s.end = 0;
  if (a.cu_seqlens == nullptr) {  // padded rows: row b is [b*T, (b+1)*T)
    int64_t row = t0 / a.T, pos = t0 - row * a.T;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (t0 + i < a.N && pos == a.T - 1) {
        s.end |= 1u << i;
        s.lv[i] = a.last_values ? a.last_values[row] : 0.f;
      }
      if (++pos == a.T) { pos = 0; ++row; }
    }
    return;
  }
  const int64_t* cu = a.cu_seqlens;  // packed: row b is [cu[b], cu[b+1])
  int64_t row = gallop_row(cu, a.B, warp_find_row(cu, a.B, t0 - lane * kItems, lane), t0);
  int64_t next = row < a.B ? __ldg(cu + row + 1) : LLONG_MAX;  // start of the next row
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t t = t0 + i;
    if (t >= a.N) break;
    if (t >= next) {
      row = gallop_row(cu, a.B, row + 1, t);
      next = row < a.B ? __ldg(cu + row + 1) : LLONG_MAX;
    }
    if (row >= a.B) {
      s.valid &= ~(1u << i);
    } else if (t + 1 >= next || t + 1 == a.N) {
      s.end |= 1u << i;
      s.lv[i] = a.last_values ? a.last_values[row] : 0.f;
    }
  }
}

// Suffix scan over lanes [0, kWidth) (lane order = time order, so it runs from the last lane
// down; a fixed tree): `incl` becomes the composition of lanes >= mine, the result that of > mine.
template <int kWidth>
__device__ __forceinline__ Map warp_suffix_scan(Map& incl, int lane) {
#pragma unroll
  for (int off = 1; off < kWidth; off <<= 1) {
    const Map o = shfl_map(incl, [&](auto x) { return __shfl_down_sync(kAll, x, off); });
    if (lane + off < kWidth) incl = compose_map(incl, o);
  }
  const Map excl = shfl_map(incl, [&](auto x) { return __shfl_down_sync(kAll, x, 1); });
  return lane >= kWidth - 1 ? pass_map() : excl;
}

// Warp 0, after the warps' inclusive maps are in s_warp: replaces them by the warps' exclusive
// maps and returns the tile's aggregate (in every lane).
__device__ __forceinline__ Map scan_warps(Map* s_warp, int lane) {
  Map w = lane < kWarps ? s_warp[lane] : pass_map();
  const Map excl = warp_suffix_scan<kWarps>(w, lane);
  if (lane < kWarps) s_warp[lane] = excl;
  return shfl_map(w, [&](auto x) { return __shfl_sync(kAll, x, 0); });
}

// a: the op's arrays (rlhf/gae_op.h: rewards, values, mask [N], cu_seqlens [B+1],
//    last_values [B] in; adv, ret [N] out); sc: this call's scratch (see Scratch);
// tiles = ceil(N / kTile) = gridDim.x; vec: the [N] arrays are aligned for float4 (mask: 8 B).
__global__ void __launch_bounds__(kThreads, 2) gae_kernel(const GaeArgs a, const Scratch sc, int64_t tiles, bool vec) {
  __shared__ Map s_warp[kWarps];  // the warps' inclusive maps, then their exclusive ones
  __shared__ State s_after;       // S_{k-1}: the state after this tile
  __shared__ int s_ticket;
  __shared__ bool s_need;         // the tile's latest step does not end a row: S_{k-1} is read
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) s_ticket = atomicAdd(sc.counter, 1);
  __syncthreads();
  const int64_t k = s_ticket, t0 = (tiles - 1 - k) * kTile + static_cast<int64_t>(threadIdx.x) * kItems;
  const double g = a.gamma, gl = a.gamma * a.lam;
  Steps s;
  s.valid = load8(a.rewards, a.mask, t0, a.N, vec, s.r);
  load8(a.values, nullptr, t0, a.N, vec, s.v);
  find_row_ends(a, t0, lane, s);
  if (threadIdx.x == kThreads - 1) s_need = ((s.end >> (kItems - 1)) & 1u) == 0;

  Map incl = pass_map();  // my steps, latest first; then the block, backwards in time
#pragma unroll
  for (int i = kItems - 1; i >= 0; --i)
    incl = compose_map(step_map((s.valid >> i) & 1u, (s.end >> i) & 1u, s.r[i], s.v[i], s.lv[i], g, gl), incl);
  const Map lane_excl = warp_suffix_scan<32>(incl, lane);
  if (lane == 0) s_warp[warp] = incl;
  __syncthreads();

  if (warp == 0) {  // the tile's aggregate: publish it, look back, publish the state
    const Map total = scan_warps(s_warp, lane);
    if (lane == 0) {
      if (total.kind == kConst) sc.state[k] = {total.b, total.q};
      else sc.agg[k] = total;
      publish(&sc.flags[k], total.kind == kConst ? kState : kAgg);
    }
    const State after = s_need ? look_back(sc, k, lane) : State{0.0, 0.f};  // else total is const
    if (lane == 0) {
      if (total.kind != kConst) {
        sc.state[k] = apply_map(total, after);
        publish(&sc.flags[k], kState);
      }
      s_after = after;
    }
  }
  __syncthreads();

  // My incoming state, then my steps one by one with the CPU's per-step math, latest first.
  const State in = apply_map(compose_map(lane_excl, s_warp[warp]), s_after);
  double A = in.A, V = in.V;
#pragma unroll
  for (int i = kItems - 1; i >= 0; --i) {
    const bool ok = (s.valid >> i) & 1u;
    if ((s.end >> i) & 1u) { A = 0.0; V = s.lv[i]; }
    A = apply(gae_step_map<double>(ok, s.r[i], s.v[i], V, g, a.lam), A);
    V = ok ? static_cast<double>(s.v[i]) : V;
    s.r[i] = ok ? static_cast<float>(A) : 0.f;
    s.v[i] = ok ? static_cast<float>(A + static_cast<double>(s.v[i])) : 0.f;
  }
  store8(a.adv, t0, a.N, vec, s.r);
  store8(a.ret, t0, a.N, vec, s.v);
}

// ---- masked_whiten ----
constexpr int kMaxParts = 1024;

struct Stat {
  double n, mean, m2;  // count, mean, sum of squared deviations
};

__device__ __forceinline__ Stat merge(const Stat& x, const Stat& y) {  // Chan et al.
  if (y.n == 0) return x;
  if (x.n == 0) return y;
  const double n = x.n + y.n, d = y.mean - x.mean, f = y.n / n;
  return {n, x.mean + d * f, x.m2 + y.m2 + d * d * x.n * f};
}

// A fixed tree over the block (every thread gets the result); buf: __shared__ Stat[kWarps + 1].
__device__ Stat block_merge(Stat s, Stat* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    s = merge(s, {__shfl_down_sync(kAll, s.n, off), __shfl_down_sync(kAll, s.mean, off),
                  __shfl_down_sync(kAll, s.m2, off)});
  if (lane == 0) buf[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    Stat t = buf[0];
    for (int w = 1; w < kWarps; ++w) t = merge(t, buf[w]);
    buf[kWarps] = t;
  }
  __syncthreads();
  const Stat r = buf[kWarps];
  __syncthreads();  // buf is reused
  return r;
}

// a: x, mask [n] in, out [n] out (rlhf/gae_op.h); chunk: steps per part (a multiple of kTile);
// parts = ceil(n / chunk) <= kMaxParts; part_buf: [parts, 3] float64 scratch (n, mean, M2);
// vec: x and out aligned for float4, mask for 8 bytes. Launched cooperatively.
__global__ void __launch_bounds__(kThreads) whiten_kernel(const WhitenArgs a, int64_t chunk, int64_t parts,
                                                          double* __restrict__ part_buf, bool vec) {
  __shared__ Stat buf[kWarps + 1];
  for (int64_t p = blockIdx.x; p < parts; p += gridDim.x) {  // 1. one Stat per part
    Stat acc = {0.0, 0.0, 0.0};
    const int64_t stop = std::min(a.n, (p + 1) * chunk);
#pragma unroll 4
    for (int64_t i = p * chunk + static_cast<int64_t>(threadIdx.x) * 8; i < stop; i += kTile) {
      float x[8];
      const unsigned m = load8(a.x, a.mask, i, a.n, vec, x);
      double sum = 0.0, cnt = 0.0;
#pragma unroll
      for (int j = 0; j < 8; ++j) if ((m >> j) & 1u) { sum += x[j]; cnt += 1.0; }
      const double mean = cnt > 0 ? sum / cnt : 0.0;
      double m2 = 0.0;
#pragma unroll
      for (int j = 0; j < 8; ++j) if ((m >> j) & 1u) { const double d = x[j] - mean; m2 = fma(d, d, m2); }
      acc = merge(acc, {cnt, mean, m2});
    }
    acc = block_merge(acc, buf);
    if (threadIdx.x == 0) { part_buf[3 * p] = acc.n; part_buf[3 * p + 1] = acc.mean; part_buf[3 * p + 2] = acc.m2; }
  }
  cooperative_groups::this_grid().sync();  // release/acquire barrier: every part is visible now

  Stat acc = {0.0, 0.0, 0.0};  // 2. all parts, the same fixed order in every block
  for (int64_t p = threadIdx.x; p < parts; p += kThreads)
    acc = merge(acc, {__ldcg(part_buf + 3 * p), __ldcg(part_buf + 3 * p + 1), __ldcg(part_buf + 3 * p + 2)});
  acc = block_merge(acc, buf);
  const double denom = a.unbiased ? acc.n - 1 : acc.n;
  const double var = denom > 0 ? acc.m2 / denom : 0.0;
  const double mean = acc.n > 0 ? acc.mean : 0.0, inv_std = 1.0 / sqrt(var + a.eps);
  const double add_back = a.shift_mean ? 0.0 : mean;

  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * 8; i < a.n;  // 3. write
       i += static_cast<int64_t>(gridDim.x) * kTile) {
    float x[8];
    const unsigned m = load8(a.x, a.mask, i, a.n, vec, x);
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = (m >> j) & 1u ? static_cast<float>((x[j] - mean) * inv_std + add_back) : 0.f;
    store8(a.out, i, a.n, vec, x);
  }
}

// Co-resident whiten blocks on device `dev`, cached (no sync: attribute and occupancy queries).
int whiten_max_blocks(int dev) {
  static std::atomic<int> cache[64];
  const int cached = dev < 64 ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (cached > 0) return cached;
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, whiten_kernel, kThreads, 0));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int blocks = std::max(1, per_sm * sms);
  if (dev < 64) cache[dev].store(blocks, std::memory_order_relaxed);
  return blocks;
}

bool aligned(const void* p, uintptr_t to) { return reinterpret_cast<uintptr_t>(p) % to == 0; }

struct CudaGae {
  static void gae(const GaeArgs& a, const at::Tensor& like) {
    const char* op = a.cu_seqlens ? "gae_packed" : "gae";
    if (a.N == 0) return;
    const int64_t tiles = (a.N + kTile - 1) / kTile;
    TORCH_CHECK_VALUE(tiles <= INT_MAX, op, ": too many steps for one launch: N=", a.N);
    const c10::cuda::CUDAGuard guard(like.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t head = (16 + 4 * tiles + 15) / 16 * 16;  // counter, flags: zeroed
    at::Tensor scratch = at::empty({head + tiles * static_cast<int64_t>(sizeof(Map) + sizeof(State))},
                                   like.options().dtype(at::kByte));
    char* base = static_cast<char*>(scratch.data_ptr());
    const Scratch sc = {reinterpret_cast<int*>(base), reinterpret_cast<int*>(base + 16),
                        reinterpret_cast<Map*>(base + head),
                        reinterpret_cast<State*>(base + head + tiles * sizeof(Map))};
    C10_CUDA_CHECK(cudaMemsetAsync(base, 0, head, stream));
    const bool vec = aligned(a.rewards, 16) && aligned(a.values, 16) && aligned(a.adv, 16) && aligned(a.ret, 16) &&
                     (a.mask == nullptr || aligned(a.mask, 8));
    gae_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(a, sc, tiles, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void masked_whiten(const WhitenArgs& a, const at::Tensor& like) {
    if (a.n == 0) return;
    const c10::cuda::CUDAGuard guard(like.device());
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t tiles = (a.n + kTile - 1) / kTile;
    const int64_t chunk = kTile * std::max<int64_t>(4, (tiles + kMaxParts - 1) / kMaxParts);
    int64_t parts = (a.n + chunk - 1) / chunk, chunk_arg = chunk;
    at::Tensor part_buf = at::empty({parts * 3}, like.options().dtype(at::kDouble));
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(parts, whiten_max_blocks(like.device().index())));
    bool vec = aligned(a.x, 16) && aligned(a.out, 16) && aligned(a.mask, 8);
    WhitenArgs args = a;
    double* pb = part_buf.data_ptr<double>();
    void* params[] = {&args, &chunk_arg, &parts, &pb, &vec};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&whiten_kernel), dim3(grid),
                                               dim3(kThreads), params, 0, stream));
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("gae", &rlhf::gae_forward<rlhf::CudaGae>);
  m.impl("gae_packed", &rlhf::gae_packed_forward<rlhf::CudaGae>);
  m.impl("masked_whiten", &rlhf::masked_whiten_forward<rlhf::CudaGae>);
}
