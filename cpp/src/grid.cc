// Code grids (docs/FORMAT.md section 10), scalar. Every float32 operation is
// written out in the order of the numpy twin (python/arrowquant/reference/
// grid.py); the build has -ffp-contract=off, so nothing is fused.
#include "arrowquant/grid.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "arrowquant/dtype.h"
#include "kernels/grid_kernels.h"

namespace arrowquant::grid {
namespace {

float RoundF16(float v) { return HalfToFloat(FloatToHalf(v)); }

float RoundScale(float s) {
  const float r = RoundF16(s);
  return (r == 0.0f && s > 0.0f) ? 0x1p-24f : r;
}

bool Usable(float s, float z) {
  return s > 0.0f && std::isfinite(s) && std::isfinite(1.0f / s) && std::isfinite(z);
}

int64_t Groups(const GridShape& sh) { return (sh.cols + sh.group_size - 1) / sh.group_size; }

Status CheckShape(const GridShape& sh) {
  if (sh.bits != 2 && sh.bits != 4 && sh.bits != 8) {
    return Status::Invalid("grid bits must be 2, 4 or 8, got " + std::to_string(sh.bits));
  }
  if (sh.rows < 0 || sh.cols < 0 || sh.group_size <= 0) {
    return Status::Invalid("grid: rows, cols must be >= 0 and the group size > 0");
  }
  return Status::OK();
}

// Midpoints t[k] = (L[k] + L[k+1]) * 0.5f.
std::vector<float> Midpoints(const float* L, int n) {
  std::vector<float> t(n - 1);
  for (int k = 0; k + 1 < n; ++k) t[k] = (L[k] + L[k + 1]) * 0.5f;
  return t;
}

// The number of midpoints below u: a branch-free count for 4-bit and 2-bit
// tables (predictable, and what the numpy twin's searchsorted returns), a
// binary search over the 255 midpoints of an 8-bit table.
inline int CodeOf(float u, const std::vector<float>& t) {
  const size_t n = t.size();
  if (n <= 15) {
    int q = 0;
    for (size_t k = 0; k < n; ++k) q += u > t[k] ? 1 : 0;
    return q;
  }
  return static_cast<int>(std::lower_bound(t.begin(), t.end(), u) - t.begin());
}

inline float Weight(const float* importance, int64_t c) {
  return importance ? importance[c] : 1.0f;
}

// One group: x[0..n), weights from column c0 on.
struct Group {
  const float* x;
  int64_t n;
  int64_t c0;
};

// Weighted squared error in eight float32 lanes (element i -> lane i % 8).
// The AVX2 error pass when the table has 16 levels and it is not forced off.
GridErrorFn FastError(const GridShape& sh) {
  return (sh.bits == 4 && !sh.force_scalar) ? Avx2GridError4() : nullptr;
}

float GroupError(const Group& g, const float* importance, const float* L,
                 const std::vector<float>& t, float s, float z, GridErrorFn fast) {
  if (fast) return fast(g.x, g.n, importance ? importance + g.c0 : nullptr, L, t.data(), s, z);
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const float inv = 1.0f / s;
  for (int64_t i = 0; i < g.n; ++i) {
    const float u = g.x[i] * inv + z;
    const float xh = (L[CodeOf(u, t)] - z) * s;
    const float d = g.x[i] - xh;
    const float dd = d * d;
    lane[i % 8] += Weight(importance, g.c0 + i) * dd;
  }
  const float a0 = lane[0] + lane[4], a1 = lane[1] + lane[5];
  const float a2 = lane[2] + lane[6], a3 = lane[3] + lane[7];
  return (a0 + a2) + (a1 + a3);
}

void SearchGroup(const Group& g, const float* importance, const float* L,
                 const std::vector<float>& t, int bits, bool f16, float* out_s, float* out_z,
                 bool* ok_out, GridErrorFn fast) {
  const float Q = static_cast<float>((1 << bits) - 1);
  float lo = std::numeric_limits<float>::infinity();
  float hi = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < g.n; ++i) {
    lo = std::min(lo, g.x[i]);
    hi = std::max(hi, g.x[i]);
  }
  const bool constant = !(hi > lo);
  float best_s = 0.0f, best_z = 0.0f;
  float best_e = std::numeric_limits<float>::infinity();
  auto consider = [&](float s, float z) {
    if (!Usable(s, z)) return;
    const float e = GroupError(g, importance, L, t, s, z, fast);
    if (e < best_e) {
      best_s = s;
      best_z = z;
      best_e = e;
    }
  };
  for (const float f : kGridClips) {
    const float lo_c = lo * f;
    const float hi_c = hi * f;
    float s = constant ? 1.0f : (hi_c - lo_c) / Q;
    if (f16) s = RoundScale(s);
    float z = constant ? -lo : -lo_c / s;
    if (f16) z = RoundF16(z);
    consider(s, z);
  }
  for (int r = 0; r < kGridRefits; ++r) {
    if (!std::isfinite(best_e)) break;
    double sw = 0, sl = 0, sll = 0, sx = 0, slx = 0;
    const float inv = 1.0f / best_s;
    for (int64_t i = 0; i < g.n; ++i) {
      const float u = g.x[i] * inv + best_z;
      const double lq = static_cast<double>(L[CodeOf(u, t)]);
      const double w = static_cast<double>(Weight(importance, g.c0 + i));
      const double x = static_cast<double>(g.x[i]);
      const double wl = w * lq;
      sw += w;
      sl += wl;
      sll += wl * lq;
      sx += w * x;
      slx += wl * x;
    }
    const double det = sw * sll - sl * sl;
    const double a = (sw * slx - sl * sx) / det;
    const double c = (sll * sx - sl * slx) / det;
    if (!(det > 0) || !std::isfinite(a) || !std::isfinite(c) || !(a > 0)) continue;
    float s = static_cast<float>(a);
    if (f16) s = RoundScale(s);
    float z = static_cast<float>(-c / static_cast<double>(s));
    if (f16) z = RoundF16(z);
    consider(s, z);
  }
  *out_s = best_s;
  *out_z = best_z;
  *ok_out = std::isfinite(best_e);
}

}  // namespace

Status CheckLevels(const float* levels, int bits) {
  const int n = 1 << bits;
  for (int k = 0; k < n; ++k) {
    if (!std::isfinite(levels[k]) || (k > 0 && !(levels[k] > levels[k - 1]))) {
      return Status::Invalid("grid levels must be finite and strictly increasing");
    }
  }
  if (levels[0] != 0.0f || levels[n - 1] != static_cast<float>(n - 1)) {
    return Status::Invalid("grid levels must run from 0 to " + std::to_string(n - 1));
  }
  return Status::OK();
}

Status LearnLevels(const float* x, const GridShape& sh, const float* importance, const float* start,
                   float* levels) {
  AQ_RETURN_NOT_OK(CheckShape(sh));
  const int n = 1 << sh.bits;
  const int Q = n - 1;
  std::vector<float> L(start, start + n);
  AQ_RETURN_NOT_OK(CheckLevels(L.data(), sh.bits));
  // Normalized values under each group's float32 parameters searched on the
  // starting table, in group order (the twin's flattened (groups, elements)
  // order), constant groups and w <= 0 left out.
  const std::vector<float> t0 = Midpoints(L.data(), n);
  std::vector<float> u;
  std::vector<double> w;
  const int64_t G = Groups(sh);
  for (int64_t r = 0; r < sh.rows; ++r) {
    for (int64_t j = 0; j < G; ++j) {
      const int64_t c0 = j * sh.group_size;
      const int64_t len = std::min(sh.group_size, sh.cols - c0);
      const float* g = x + r * sh.cols + c0;
      float lo = g[0], hi = g[0];
      for (int64_t i = 1; i < len; ++i) {
        lo = std::min(lo, g[i]);
        hi = std::max(hi, g[i]);
      }
      if (!(hi > lo)) continue;
      float s = 1.0f, z = 0.0f;
      bool ok = false;
      SearchGroup(Group{g, len, c0}, importance, L.data(), t0, sh.bits, false, &s, &z, &ok,
                  FastError(sh));
      if (!ok) {
        return Status::Invalid("grid parameters not representable (row " + std::to_string(r) +
                               ", group " + std::to_string(j) + ")");
      }
      const float inv = 1.0f / s;
      for (int64_t i = 0; i < len; ++i) {
        const float wi = Weight(importance, c0 + i);
        if (!(wi > 0.0f)) continue;
        u.push_back(g[i] * inv + z);
        w.push_back(static_cast<double>(wi));
      }
    }
  }
  for (int it = 0; it < kLloydIters; ++it) {
    const std::vector<float> t = Midpoints(L.data(), n);
    std::vector<double> sw(n, 0.0), su(n, 0.0);
    for (size_t i = 0; i < u.size(); ++i) {
      const int k = CodeOf(u[i], t);
      sw[k] += w[i];
      su[k] += w[i] * static_cast<double>(u[i]);
    }
    std::vector<float> next = L;
    for (int k = 1; k < Q; ++k) {
      if (sw[k] > 0) next[k] = static_cast<float>(su[k] / sw[k]);
    }
    bool increasing = true;
    for (int k = 1; k < n; ++k) increasing = increasing && next[k] > next[k - 1];
    if (!increasing) break;
    L = next;
  }
  std::copy(L.begin(), L.end(), levels);
  return CheckLevels(levels, sh.bits);
}

Status Quantize(const float* x, const GridShape& sh, bool f16, const float* levels,
                const float* importance, uint8_t* codes, float* scales, float* zero_points) {
  AQ_RETURN_NOT_OK(CheckShape(sh));
  AQ_RETURN_NOT_OK(CheckLevels(levels, sh.bits));
  const std::vector<float> t = Midpoints(levels, 1 << sh.bits);
  const int64_t G = Groups(sh);
  for (int64_t r = 0; r < sh.rows; ++r) {
    for (int64_t j = 0; j < G; ++j) {
      const int64_t c0 = j * sh.group_size;
      const Group g{x + r * sh.cols + c0, std::min(sh.group_size, sh.cols - c0), c0};
      float s = 1.0f, z = 0.0f;
      bool ok = false;
      SearchGroup(g, importance, levels, t, sh.bits, f16, &s, &z, &ok, FastError(sh));
      if (!ok) {
        return Status::Invalid("grid parameters not representable (row " + std::to_string(r) +
                               ", group " + std::to_string(j) + "); use float32 parameters");
      }
      scales[r * G + j] = s;
      zero_points[r * G + j] = z;
      const float inv = 1.0f / s;
      for (int64_t i = 0; i < g.n; ++i) {
        const float u = g.x[i] * inv + z;
        codes[r * sh.cols + c0 + i] = static_cast<uint8_t>(CodeOf(u, t));
      }
    }
  }
  return Status::OK();
}

Status QuantizeSuperblock(const float* x, const GridShape& sh, const float* levels,
                          const float* importance, uint8_t* codes, const SuperblockOut& out) {
  AQ_RETURN_NOT_OK(CheckShape(sh));
  AQ_RETURN_NOT_OK(CheckLevels(levels, sh.bits));
  const std::vector<float> t = Midpoints(levels, 1 << sh.bits);
  const int64_t G = Groups(sh);
  const int64_t K = std::max<int64_t>(1, 256 / sh.group_size);
  const int64_t S = (G + K - 1) / K;
  const int P = sh.bits == 2 ? 15 : 63;
  const float Pf = static_cast<float>(P);
  std::vector<float> s1(K), z1(K);
  for (int64_t r = 0; r < sh.rows; ++r) {
    for (int64_t b = 0; b < S; ++b) {
      const int64_t j0 = b * K, j1 = std::min(G, j0 + K);
      // Stage 1: each group's float32 grid search.
      float s_max = 0.0f, z_max = 0.0f;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t c0 = j * sh.group_size;
        const Group g{x + r * sh.cols + c0, std::min(sh.group_size, sh.cols - c0), c0};
        bool ok = false;
        SearchGroup(g, importance, levels, t, sh.bits, false, &s1[j - j0], &z1[j - j0], &ok,
                    FastError(sh));
        if (!ok) {
          return Status::Invalid("grid parameters not representable (row " + std::to_string(r) +
                                 ", group " + std::to_string(j) + ")");
        }
        s_max = std::max(s_max, s1[j - j0]);
        z_max = std::max(z_max, std::max(z1[j - j0], 0.0f));
      }
      // The units.
      const float d = RoundScale(s_max / Pf);
      const float dz = z_max > 0.0f ? RoundScale(z_max / Pf) : 1.0f;
      if (!std::isfinite(d) || !std::isfinite(dz)) {
        return Status::Invalid("grid superblock unit not representable in float16 (row " +
                               std::to_string(r) + ", group " + std::to_string(j0) +
                               "); use float32 parameters");
      }
      out.units[(r * S + b) * 2] = d;
      out.units[(r * S + b) * 2 + 1] = dz;
      // Stage 2: nearest codes, then the fourteen neighbours.
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t c0 = j * sh.group_size;
        const Group g{x + r * sh.cols + c0, std::min(sh.group_size, sh.cols - c0), c0};
        const float a_near = std::nearbyint(s1[j - j0] / d);
        const float c_near = std::nearbyint(std::max(z1[j - j0], 0.0f) / dz);
        const int a0 = static_cast<int>(std::min(std::max(a_near, 1.0f), Pf));
        const int cz0 = static_cast<int>(std::min(std::max(c_near, 0.0f), Pf));
        int best_a = a0, best_c = cz0;
        float best_e = GroupError(g, importance, levels, t, static_cast<float>(a0) * d,
                                  static_cast<float>(cz0) * dz, FastError(sh));
        for (int i = -1; i <= 1; ++i) {
          for (int k = -2; k <= 2; ++k) {
            if (i == 0 && k == 0) continue;
            const int a = std::min(std::max(a0 + i, 1), P);
            const int c = std::min(std::max(cz0 + k, 0), P);
            const float e = GroupError(g, importance, levels, t, static_cast<float>(a) * d,
                                       static_cast<float>(c) * dz, FastError(sh));
            if (e < best_e) {
              best_e = e;
              best_a = a;
              best_c = c;
            }
          }
        }
        const float s = static_cast<float>(best_a) * d;
        const float z = static_cast<float>(best_c) * dz;
        out.scales[r * G + j] = s;
        out.zero_points[r * G + j] = z;
        out.a_codes[r * G + j] = static_cast<uint8_t>(best_a);
        out.c_codes[r * G + j] = static_cast<uint8_t>(best_c);
        const float inv = 1.0f / s;
        for (int64_t e = 0; e < g.n; ++e) {
          codes[r * sh.cols + c0 + e] = static_cast<uint8_t>(CodeOf(g.x[e] * inv + z, t));
        }
      }
    }
  }
  return Status::OK();
}

Status Dequantize(const uint8_t* codes, const GridShape& sh, const float* levels,
                  const float* scales, const float* zero_points, float* out) {
  AQ_RETURN_NOT_OK(CheckShape(sh));
  AQ_RETURN_NOT_OK(CheckLevels(levels, sh.bits));
  const int64_t G = Groups(sh);
  const int n = 1 << sh.bits;
  for (int64_t r = 0; r < sh.rows; ++r) {
    for (int64_t c = 0; c < sh.cols; ++c) {
      const int q = codes[r * sh.cols + c];
      if (q >= n) return Status::Invalid("grid code " + std::to_string(q) + " out of range");
      const int64_t j = c / sh.group_size;
      out[r * sh.cols + c] = (levels[q] - zero_points[r * G + j]) * scales[r * G + j];
    }
  }
  return Status::OK();
}

}  // namespace arrowquant::grid
