// Critic-free advantages (group_advantages) on the CPU: the launcher `CpuGroupAdv` of
// rlhf/group_advantages_op.h (which checks, converts and allocates); the math is rlhf/group_advantages.h.
//
// Groups. With group_size G, group g is the sequences [g*G, (g+1)*G). With group_index, one
// pass over the ids numbers the groups in order of first appearance (an open-addressing hash
// table, linear probing), then a stable counting sort lists each group's members in index
// order (offsets + members, as CSR).
// Statistics. Each group alone, in float64, its members in index order (four interleaved
// partial sums added in a fixed order): the same bits whatever the number of threads. Groups
// run in parallel (at::parallel_for; batches under kGrain sequences run inline: there the
// thread pool's wake-up would cost more than the work). reinforce++'s batch statistics merge
// the groups' statistics of x = r - mean (Chan et al.) over fixed chunks of groups, then the
// chunks in order: again independent of the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "rlhf/cpu_vec.h"
#include "rlhf/group_advantages.h"
#include "rlhf/group_advantages_op.h"

namespace rlhf {
namespace {

constexpr int64_t kGrain = 32768;       // sequences (or mask elements) per parallel task
constexpr int64_t kChunkGroups = 1024;  // groups per partial of reinforce++'s batch statistics

// A group's statistics and the sum of its x = r - mean (for reinforce++'s batch statistics).
struct GroupSums {
  GroupStat s;
  double x_sum;
};

// The statistics of the n rewards r[members[first + i]], i < n: lane j of four float64 partial
// sums takes the members j, j+4, ...; the lanes are added as (0+1)+(2+3).
GroupSums indexed_sums(const float* r, const int64_t* members, int64_t first, int64_t n) {
  auto at = [&](int64_t i) { return static_cast<double>(r[members[first + i]]); };
  double s[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) s[j] += at(i + j);
  for (int j = 0; i < n; ++i, ++j) s[j] += at(i);
  const double mean = ((s[0] + s[1]) + (s[2] + s[3])) / static_cast<double>(n);
  double q[4] = {0, 0, 0, 0}, x[4] = {0, 0, 0, 0};
  for (i = 0; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) {
      const double d = at(i + j) - mean;
      x[j] += d;
      q[j] += d * d;
    }
  for (int j = 0; i < n; ++i, ++j) {
    const double d = at(i) - mean;
    x[j] += d;
    q[j] += d * d;
  }
  return {{static_cast<double>(n), mean, (q[0] + q[1]) + (q[2] + q[3])}, (x[0] + x[1]) + (x[2] + x[3])};
}

// Sequences numbered by group: group_of[i] in [0, groups), members of group g at
// members[offsets[g] .. offsets[g+1]) in index order.
struct Grouping {
  std::vector<int64_t> group_of, offsets, members;
  int64_t groups = 0;
};

inline uint64_t mix_bits(uint64_t x) {  // splitmix64's finalizer: neighbouring ids spread over the table
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// An open-addressing table id -> group number (linear probing) kept at most a quarter full,
// doubled when needed: sized by the number of groups, not of sequences, so it stays in cache.
// The first size assumes groups of 8 or more (no rehash then), at most 64k slots (1 MiB).
class GroupTable {
 public:
  explicit GroupTable(int64_t B) {
    while (cap_ < std::min<int64_t>(B / 2, int64_t(1) << 16)) cap_ *= 2;
    slot_.assign(cap_, Slot{0, -1});
  }

  // The group number of `id`, numbering a new id `fresh`.
  int64_t find_or_add(int64_t id, int64_t fresh) {
    if (4 * (fresh + 1) > cap_) grow();
    uint64_t h = slot_of(id);
    while (slot_[h].group >= 0 && slot_[h].id != id) h = (h + 1) & (cap_ - 1);
    if (slot_[h].group < 0) slot_[h] = {id, fresh};
    return slot_[h].group;
  }

 private:
  struct Slot {
    int64_t id, group;  // group -1: empty
  };
  uint64_t slot_of(int64_t id) const { return mix_bits(static_cast<uint64_t>(id)) & (cap_ - 1); }
  void grow() {
    std::vector<Slot> old = std::move(slot_);
    cap_ *= 2;
    slot_.assign(cap_, Slot{0, -1});
    for (const Slot& s : old) {
      if (s.group < 0) continue;
      uint64_t h = slot_of(s.id);
      while (slot_[h].group >= 0) h = (h + 1) & (cap_ - 1);
      slot_[h] = s;
    }
  }
  int64_t cap_ = 512;
  std::vector<Slot> slot_;
};

Grouping group_by_id(const int64_t* ids, int64_t B) {
  GroupTable table(B);
  Grouping g;
  g.group_of.resize(B);
  std::vector<int64_t> count;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t k = table.find_or_add(ids[i], static_cast<int64_t>(count.size()));
    if (k == static_cast<int64_t>(count.size())) count.push_back(0);
    g.group_of[i] = k;
    ++count[k];
  }
  g.groups = static_cast<int64_t>(count.size());
  g.offsets.resize(g.groups + 1);
  g.offsets[0] = 0;
  for (int64_t k = 0; k < g.groups; ++k) g.offsets[k + 1] = g.offsets[k] + count[k];
  std::vector<int64_t> cursor(g.offsets.begin(), g.offsets.end() - 1);
  g.members.resize(B);
  for (int64_t i = 0; i < B; ++i) g.members[cursor[g.group_of[i]]++] = i;
  return g;
}

// reinforce++'s batch statistics of x = r - group mean over the members of every in_batch group.
AdvAffine batch_stats(const std::vector<GroupSums>& st, double eps) {
  const int64_t groups = static_cast<int64_t>(st.size()), chunks = (groups + kChunkGroups - 1) / kChunkGroups;
  std::vector<GroupStat> part(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      GroupStat acc = {0, 0, 0};
      for (int64_t g = c * kChunkGroups, e = std::min(groups, g + kChunkGroups); g < e; ++g) {
        const GroupStat& s = st[g].s;
        if (!in_batch(s)) continue;
        const double xm = st[g].x_sum / s.n;  // x's own mean in the group: 0 up to rounding
        acc = merge_stat(acc, {s.n, xm, s.m2 - st[g].x_sum * xm});
      }
      part[c] = acc;
    }
  });
  GroupStat b = {0, 0, 0};
  for (const GroupStat& p : part) b = merge_stat(b, p);
  return batch_affine(b, eps);
}

// A group's advantage transform: adv = whiten ? (r - f.center - batch.center) * batch.scale
// : (r - f.center) * f.scale (rlhf/group_advantages.h, member_advantage).
struct GroupMap {
  AdvAffine f;
  bool whiten;
};

inline GroupMap group_map(int mode, const GroupStat& s, double eps) {
  return {group_affine(mode, s, eps), mode == kReinforcePP && in_batch(s)};
}

inline float advantage(const GroupMap& m, const AdvAffine& batch, float r) {
  return static_cast<float>(m.whiten ? apply_affine(batch, static_cast<double>(r) - m.f.center)
                                     : apply_affine(m.f, static_cast<double>(r)));
}

// ---- consecutive groups (group_size): vectorized over a group's members ----
// Four float64 lanes; lane j sums the members j, j+4, ..., the tail (G % 4 members) goes to
// lanes 0.. in scalar code, and the lanes are added as (0+1)+(2+3): the order of indexed_sums
// above, the same bits in the AVX2 clone and the baseline build (no FMA contraction in ISO C++).
typedef double VecD __attribute__((vector_size(32)));
typedef float VecF4 __attribute__((vector_size(16)));

inline VecD load4(const float* p) {
  VecF4 x;
  std::memcpy(&x, p, sizeof(x));
  return __builtin_convertvector(x, VecD);
}

inline void store4(float* p, VecD y) {
  const VecF4 x = __builtin_convertvector(y, VecF4);
  std::memcpy(p, &x, sizeof(x));
}

inline double lanes_sum(VecD v, double t0, double t1, double t2) {
  return ((v[0] + t0) + (v[1] + t1)) + ((v[2] + t2) + v[3]);
}

// The statistics of groups [g0, g1) of G consecutive rewards.
RLHF_CPU_CLONES void consecutive_sums(const float* r, int64_t G, int64_t g0, int64_t g1, GroupSums* st) {
  const int64_t body = G & ~int64_t(3);
  for (int64_t g = g0; g < g1; ++g) {
    const float* x = r + g * G;
    VecD s = {0, 0, 0, 0};
    for (int64_t i = 0; i < body; i += 4) s += load4(x + i);
    double t[3] = {0, 0, 0};
    for (int64_t i = body; i < G; ++i) t[i - body] = x[i];
    const double mean = lanes_sum(s, t[0], t[1], t[2]) / static_cast<double>(G);
    VecD q = {0, 0, 0, 0}, xs = {0, 0, 0, 0};
    for (int64_t i = 0; i < body; i += 4) {
      const VecD d = load4(x + i) - mean;
      xs += d;
      q += d * d;
    }
    double tq[3] = {0, 0, 0}, tx[3] = {0, 0, 0};
    for (int64_t i = body; i < G; ++i) {
      const double d = x[i] - mean;
      tx[i - body] = d;
      tq[i - body] = d * d;
    }
    st[g - g0] = {{static_cast<double>(G), mean, lanes_sum(q, tq[0], tq[1], tq[2])},
                  lanes_sum(xs, tx[0], tx[1], tx[2])};
  }
}

// out[i] for the members of groups [g0, g1): advantage(maps[g - g0], batch, r[i]), four at a time.
RLHF_CPU_CLONES void consecutive_write(const float* r, int64_t G, int64_t g0, int64_t g1, const GroupMap* maps,
                                       AdvAffine batch, float* out) {
  const int64_t body = G & ~int64_t(3);
  for (int64_t g = g0; g < g1; ++g) {
    const GroupMap& m = maps[g - g0];
    const float* x = r + g * G;
    float* o = out + g * G;
    if (m.whiten) {
      for (int64_t i = 0; i < body; i += 4) store4(o + i, ((load4(x + i) - m.f.center) - batch.center) * batch.scale);
    } else {
      for (int64_t i = 0; i < body; i += 4) store4(o + i, (load4(x + i) - m.f.center) * m.f.scale);
    }
    for (int64_t i = body; i < G; ++i) o[i] = advantage(m, batch, x[i]);
  }
}

void consecutive_groups(const GroupAdvArgs& a) {
  const int64_t G = a.group_size, groups = a.B / G, grain = std::max<int64_t>(1, kGrain / G);
  if (a.mode != kReinforcePP) {  // one pass, kBatch groups at a time: statistics, transforms, advantages
    constexpr int64_t kBatch = 64;
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
      GroupSums st[kBatch];
      GroupMap maps[kBatch];
      for (int64_t b0 = g0; b0 < g1; b0 += kBatch) {
        const int64_t b1 = std::min(g1, b0 + kBatch);
        consecutive_sums(a.rewards, G, b0, b1, st);
        for (int64_t g = b0; g < b1; ++g) maps[g - b0] = group_map(a.mode, st[g - b0].s, a.eps);
        consecutive_write(a.rewards, G, b0, b1, maps, {0.0, 1.0}, a.adv);
      }
    });
    return;
  }
  std::vector<GroupSums> st(groups);
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) { consecutive_sums(a.rewards, G, g0, g1, &st[g0]); });
  const AdvAffine batch = batch_stats(st, a.eps);
  std::vector<GroupMap> maps(groups);
  for (int64_t g = 0; g < groups; ++g) maps[g] = group_map(a.mode, st[g].s, a.eps);
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    consecutive_write(a.rewards, G, g0, g1, &maps[g0], batch, a.adv);
  });
}

// ---- indexed groups (group_index) ----
void indexed_groups(const GroupAdvArgs& a) {
  const Grouping grp = group_by_id(a.group_index, a.B);
  const int64_t groups = grp.groups, grain = std::max<int64_t>(1, kGrain * groups / a.B);
  std::vector<GroupSums> st(groups);
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      st[g] = indexed_sums(a.rewards, grp.members.data(), grp.offsets[g], grp.offsets[g + 1] - grp.offsets[g]);
  });
  const AdvAffine batch = a.mode == kReinforcePP ? batch_stats(st, a.eps) : AdvAffine{0.0, 1.0};
  std::vector<GroupMap> maps(groups);
  for (int64_t g = 0; g < groups; ++g) maps[g] = group_map(a.mode, st[g].s, a.eps);
  at::parallel_for(0, a.B, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) a.adv[i] = advantage(maps[grp.group_of[i]], batch, a.rewards[i]);
  });
}

// token_adv[b, t] = mask[b, t] ? adv[b] : 0 (a select, so a NaN advantage stays out of masked tokens).
void expand(const GroupAdvArgs& a) {
  const int64_t T = a.T;
  if (T == 0) return;
  at::parallel_for(0, a.B, std::max<int64_t>(1, kGrain / T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float v = a.adv[b];
      const bool* m = a.mask + b * T;
      float* o = a.token_adv + b * T;
      for (int64_t t = 0; t < T; ++t) o[t] = m[t] ? v : 0.f;
    }
  });
}

// The device launcher of rlhf/group_advantages_op.h.
struct CpuGroupAdv {
  static void group_advantages(const GroupAdvArgs& a, const at::Tensor&, const at::Tensor&) {
    if (a.group_index) indexed_groups(a);
    else consecutive_groups(a);
    if (a.token_adv) expand(a);
  }
};

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("group_advantages", &rlhf::group_advantages_forward<rlhf::CpuGroupAdv>);
  m.impl("group_advantages_masked", &rlhf::group_advantages_masked_forward<rlhf::CpuGroupAdv>);
}
