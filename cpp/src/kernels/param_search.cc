// The `mse` parameter search and float16 parameter storage (see
// param_search.h). Scalar reference passes here; param_search_avx2.cc has
// their vector twins. python/arrowquant/reference_search.py repeats every
// step in numpy, so the candidate order and each float32/float64 operation
// below are fixed by that contract: change both or neither.
#include "kernels/param_search.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "arrowquant/dtype.h"
#include "kernels/row_kernels.h"

namespace arrowquant::kernels {

namespace {

constexpr float kClips2[] = {0.8f, 0.6f};
constexpr float kClips4[] = {0.9f, 0.8f};

float Reduce8(const float* l) {
  const float a0 = l[0] + l[4], a1 = l[1] + l[5], a2 = l[2] + l[6], a3 = l[3] + l[7];
  return (a0 + a2) + (a1 + a3);
}

float Clamp(float v, float q_max) { return std::min(std::max(v, 0.0f), q_max); }

void ScalarEvalAsym(const float* x, int64_t n, float scale, float zero_point, float mid,
                    float q_max, EvalSums* result) {
  const float inv = 1.0f / scale;
  float err[8] = {0}, sxq[8] = {0};
  EvalSums out;
  for (int64_t i = 0; i < n; ++i) {
    const float q = Clamp(std::nearbyint(x[i] * inv + zero_point), q_max);
    const float e = x[i] - (q - zero_point) * scale;
    err[i & 7] += e * e;
    sxq[i & 7] += (x[i] - mid) * q;
    out.sum_q += static_cast<int64_t>(q);
    out.sum_qq += static_cast<int64_t>(q * q);
  }
  out.err = Reduce8(err);
  out.sum_xq = Reduce8(sxq);
  *result = out;
}

void ScalarEvalSym(const float* x, int64_t n, float scale, float zero_point, float q_max,
                   EvalSums* result) {
  const float inv = 1.0f / scale;
  float err[8] = {0}, sxk[8] = {0};
  EvalSums out;
  for (int64_t i = 0; i < n; ++i) {
    const float q = Clamp(std::nearbyint(x[i] * inv) + zero_point, q_max);
    const float k = q - zero_point;
    const float e = x[i] - k * scale;
    err[i & 7] += e * e;
    sxk[i & 7] += x[i] * k;
    out.sum_qq += static_cast<int64_t>(k * k);
  }
  out.err = Reduce8(err);
  out.sum_xq = Reduce8(sxk);
  *result = out;
}

float ScalarErrorAsym(const float* x, int64_t n, float scale, float zero_point, float q_max) {
  const float inv = 1.0f / scale;
  float err[8] = {0};
  for (int64_t i = 0; i < n; ++i) {
    const float q = Clamp(std::nearbyint(x[i] * inv + zero_point), q_max);
    const float e = x[i] - (q - zero_point) * scale;
    err[i & 7] += e * e;
  }
  return Reduce8(err);
}

float ScalarErrorSym(const float* x, int64_t n, float scale, float zero_point, float q_max) {
  const float inv = 1.0f / scale;
  float err[8] = {0};
  for (int64_t i = 0; i < n; ++i) {
    const float q = Clamp(std::nearbyint(x[i] * inv) + zero_point, q_max);
    const float e = x[i] - (q - zero_point) * scale;
    err[i & 7] += e * e;
  }
  return Reduce8(err);
}

float ScalarCenteredSum(const float* x, int64_t n, float mid) {
  float acc[8] = {0};
  for (int64_t i = 0; i < n; ++i) acc[i & 7] += x[i] - mid;
  return Reduce8(acc);
}

void ScalarMinMax(const float* x, int64_t n, float* lo, float* hi) {
  float l = x[0], h = x[0];
  for (int64_t i = 1; i < n; ++i) {
    l = std::min(l, x[i]);
    h = std::max(h, x[i]);
  }
  *lo = l + 0.0f;  // -0 -> +0, as rtn
  *hi = h + 0.0f;
}

float RoundF16(float v) { return HalfToFloat(FloatToHalf(v)); }

const SearchPasses kScalarPasses = {"scalar",        ScalarEvalAsym, ScalarEvalSym,
                                    ScalarErrorAsym, ScalarErrorSym, ScalarCenteredSum,
                                    ScalarMinMax,    RoundF16};

// "<what> in float16 (<rtn>scale S, zero point Z); use float32 parameters"
std::string NotRepresentable(const char* what, const char* rtn, float s, float z,
                             ParamDType param_dtype) {
  const bool f16 = param_dtype == ParamDType::kF16;
  return std::string(what) + (f16 ? " in float16 (" : " in float32 (") + rtn + "scale " +
         std::to_string(s) + ", zero point " + std::to_string(z) + ")" +
         (f16 ? "; use float32 parameters" : "");
}

// The state of one group's search: the best candidate so far.
class Search {
 public:
  Search(const SearchPasses& passes, const float* x, int64_t n, int bits, Scheme scheme,
         ParamDType param_dtype)
      : p_(passes),
        x_(x),
        n_(n),
        q_max_(static_cast<float>((1 << bits) - 1)),
        z_sym_(static_cast<float>(1 << (bits - 1))),
        symmetric_(scheme == Scheme::kSymmetric),
        f16_(param_dtype == ParamDType::kF16) {}

  float RoundScale(float s) const { return RoundScaleWith(p_, s); }

  // Storage precision of a candidate whose scale is already stored
  // (asymmetric: the zero point is derived from the rounded scale); false
  // when not representable.
  bool StoreZero(float s, float* z) const {
    if (f16_ && !symmetric_) *z = p_.round_f16(*z);
    return Representable(s, *z);
  }

  // Storage precision of a candidate; false when not representable.
  bool Store(float* s, float* z) const {
    if (f16_) {
      *s = RoundScale(*s);
      *z = symmetric_ ? z_sym_ : p_.round_f16(*z);
    }
    return Representable(*s, *z);
  }

  // A starting candidate (evaluated by Run, in the order added).
  void AddStart(float s, float z) { phases_[0][n_starts_++] = Cand{s, z, true, {}}; }

  // The search runs in kSteps steps: evaluate the starts; then
  // kMseStartRefits times refit each and evaluate the refits; then
  // kMseFinalRefits times refit from the best so far (each from the
  // previous one). The best is updated in that order, ties keeping the
  // earlier candidate. Within a step the evaluations are independent, so the
  // CPU can overlap them.
  static constexpr int kSteps = 1 + 2 * kMseStartRefits + kMseFinalRefits;

  void Step(int i) {
    if (i <= 2 * kMseStartRefits) {
      Cand* phase = phases_[(i + 1) / 2];
      if (i % 2 == 1) {  // refit the previous phase into this one
        const Cand* prev = phases_[(i - 1) / 2];
        for (int k = 0; k < n_starts_; ++k) {
          phase[k].ok = prev[k].ok && Refit(prev[k].e, &phase[k].s, &phase[k].z);
        }
      }
      for (int k = 0; k < n_starts_; ++k) {
        if (phase[k].ok) Eval(phase[k].s, phase[k].z, &phase[k].e);
      }
      for (int k = 0; k < n_starts_; ++k) {
        if (phase[k].ok) Consider(phase[k]);
      }
      return;
    }
    const int t = i - 1 - 2 * kMseStartRefits;
    const Cand* from = t == 0 ? best_ : &polish_[t - 1];
    Cand& c = polish_[t];
    c.ok = from != nullptr && from->ok && Refit(from->e, &c.s, &c.z);
    if (!c.ok) return;
    if (t + 1 < kMseFinalRefits) {
      Eval(c.s, c.z, &c.e);
    } else {  // the last candidate: its error only
      c.e.err = symmetric_ ? p_.error_sym(x_, n_, c.s, c.z, q_max_)
                           : p_.error_asym(x_, n_, c.s, c.z, q_max_);
    }
    Consider(c);
  }

  void Run() {
    for (int i = 0; i < kSteps; ++i) Step(i);
  }

  // Least-squares scale (and offset) for the codes of the last evaluation,
  // computed in float64; false when degenerate or not representable.
  bool Refit(const EvalSums& e, float* s_out, float* z_out) const {
    if (symmetric_) {
      if (e.sum_qq <= 0) return false;
      const double s = static_cast<double>(e.sum_xq) / static_cast<double>(e.sum_qq);
      float s32 = static_cast<float>(s);
      if (!(s32 > 0.0f) || !std::isfinite(s32)) return false;
      float z32 = z_sym_;
      if (!Store(&s32, &z32)) return false;
      *s_out = s32;
      *z_out = z32;
      return true;
    }
    const double dn = static_cast<double>(n_);
    const double dsl = static_cast<double>(e.sum_q);
    const double det = dn * static_cast<double>(e.sum_qq) - dsl * dsl;
    if (!(det > 0.0)) return false;
    const double dsx = static_cast<double>(sx_);
    const double s = (dn * static_cast<double>(e.sum_xq) - dsx * dsl) / det;
    const double m = (dsx - s * dsl) / dn;
    float s32 = static_cast<float>(s);
    if (!(s32 > 0.0f) || !std::isfinite(s32)) return false;
    if (f16_) s32 = RoundScale(s32);
    float z32 = static_cast<float>(-(m + static_cast<double>(mid_)) / static_cast<double>(s32));
    if (!StoreZero(s32, &z32)) return false;
    *s_out = s32;
    *z_out = z32;
    return true;
  }

  void SetCenter(float mid) {
    mid_ = mid;
    sx_ = p_.centered_sum(x_, n_, mid);
  }
  float mid() const { return mid_; }
  float centered_sum() const { return sx_; }
  void SetRange(float lo, float hi) {
    lo_ = lo;
    hi_ = hi;
  }
  float lo() const { return lo_; }
  float hi() const { return hi_; }

  bool symmetric() const { return symmetric_; }
  bool f16() const { return f16_; }
  float q_max() const { return q_max_; }
  float z_sym() const { return z_sym_; }
  void SetRtn(float s, float z) {
    s_rtn_ = s;
    z_rtn_ = z;
  }

  // The best candidate; Invalid when none was representable.
  Status Result(float* scale, float* zero_point) const {
    if (best_ == nullptr) {
      return Status::Invalid(NotRepresentable("no candidate parameters representable",
                                              "rtn: ", s_rtn_, z_rtn_,
                                              f16_ ? ParamDType::kF16 : ParamDType::kF32));
    }
    *scale = best_->s;
    *zero_point = best_->z;
    return Status::OK();
  }

  bool has_best() const { return best_ != nullptr; }
  float best_s() const { return best_->s; }
  float best_z() const { return best_->z; }

 private:
  struct Cand {
    float s, z;
    bool ok;
    EvalSums e;
  };
  // rtn (or the widened range) plus the clipped ranges.
  static constexpr int kMaxStarts = 8;

  const SearchPasses& p_;
  const float* x_;
  int64_t n_;
  float q_max_;
  float z_sym_;
  bool symmetric_;
  bool f16_;
  float mid_ = 0.0f;
  float sx_ = 0.0f;
  float lo_ = 0.0f, hi_ = 0.0f;
  float s_rtn_ = 1.0f;  // float32 rtn parameters, for the error message
  float z_rtn_ = 0.0f;
  // Every evaluated candidate keeps its own slot: phases_[0] the starts,
  // phases_[t] their t-th refits, polish_ the refits of the best.
  Cand phases_[kMseStartRefits + 1][kMaxStarts];
  Cand polish_[kMseFinalRefits];
  int n_starts_ = 0;
  // Points into phases_ or polish_ (never copied: cheaper than moving sums).
  const Cand* best_ = nullptr;

  // True error of (s, z) and the refit sums.
  void Eval(float s, float z, EvalSums* e) const {
    if (symmetric_) {
      p_.eval_sym(x_, n_, s, z, q_max_, e);
    } else {
      p_.eval_asym(x_, n_, s, z, mid_, q_max_, e);
    }
  }

  // Keeps c when strictly better than the best (or the first).
  void Consider(const Cand& c) {
    if (best_ == nullptr || c.e.err < best_->e.err) best_ = &c;
  }
};

// The rtn start at storage precision, from the float32 rtn parameters (s, z)
// and the group's lo, hi: float16 rounds the scale and re-derives the
// asymmetric zero point -lo / scale from it. When that is not representable
// (an asymmetric zero point beyond float16's range, when lo is far from 0
// relative to the spread), the range widened to include 0 is used instead:
// its zero point lies in [0, Q]. False when neither is representable.
bool RtnStart(const SearchPasses& p, ParamDType param_dtype, Scheme scheme, int bits, float lo,
              float hi, float* s, float* z) {
  const bool f16 = param_dtype == ParamDType::kF16;
  if (f16) {
    *s = RoundScaleWith(p, *s);
    if (scheme == Scheme::kAsymmetric) *z = p.round_f16(-lo / *s);
  }
  if (Representable(*s, *z)) return true;
  if (scheme == Scheme::kSymmetric) return false;
  const float lo0 = std::min(lo, 0.0f);
  const float hi0 = std::max(hi, 0.0f);
  float sw = (hi0 - lo0) / static_cast<float>((1 << bits) - 1);
  if (f16) sw = RoundScaleWith(p, sw);
  float zw = -lo0 / sw;
  if (f16) zw = p.round_f16(zw);
  if (!Representable(sw, zw)) return false;
  *s = sw;
  *z = zw;
  return true;
}

}  // namespace

const float* MseClips(int bits, int* count) {
  switch (bits) {
    case 2:
      *count = static_cast<int>(std::size(kClips2));
      return kClips2;
    case 4:
      *count = static_cast<int>(std::size(kClips4));
      return kClips4;
    default:  // 8 bits: clipping never pays at 255 steps; refits do
      *count = 0;
      return nullptr;
  }
}

float RoundScaleF16(float s) {
  const float r = RoundF16(s);
  return (r == 0.0f && s > 0.0f) ? 0x1p-24f : r;
}

float RoundScaleWith(const SearchPasses& p, float s) {
  const float r = p.round_f16(s);
  return (r == 0.0f && s > 0.0f) ? 0x1p-24f : r;
}

bool Representable(float scale, float zero_point) {
  return scale > 0.0f && std::isfinite(scale) && std::isfinite(1.0f / scale) &&
         std::isfinite(zero_point);
}

const SearchPasses& ScalarSearchPasses() { return kScalarPasses; }

const SearchPasses& BestSearchPasses() {
  static const SearchPasses* best = [] {
    const SearchPasses* avx2 = Avx2SearchPasses();
    return avx2 ? avx2 : &kScalarPasses;
  }();
  return *best;
}

Status RtnStorageParams(const float* x, int64_t n, int bits, Scheme scheme, ParamDType param_dtype,
                        float* scale, float* zero_point) {
  return RtnStorageParamsWith(BestSearchPasses(), x, n, bits, scheme, param_dtype, scale,
                              zero_point);
}

Status RtnStorageParamsWith(const SearchPasses& p, const float* x, int64_t n, int bits,
                            Scheme scheme, ParamDType param_dtype, float* scale,
                            float* zero_point) {
  if (param_dtype == ParamDType::kF32) {
    return RtnGroupParams(x, n, bits, scheme, scale, zero_point);
  }
  float lo = 0.0f, hi = 0.0f;
  p.min_max(x, n, &lo, &hi);
  AQ_RETURN_NOT_OK(RtnFromRange(lo, hi, bits, scheme, scale, zero_point));
  const float s = *scale, z = *zero_point;
  if (!RtnStart(p, param_dtype, scheme, bits, lo, hi, scale, zero_point)) {
    return Status::Invalid(
        NotRepresentable("rtn parameters not representable", "", s, z, param_dtype));
  }
  return Status::OK();
}

Status MseGroupParams(const float* x, int64_t n, int bits, Scheme scheme, ParamDType param_dtype,
                      float* scale, float* zero_point) {
  return MseGroupParamsWith(BestSearchPasses(), x, n, bits, scheme, param_dtype, scale, zero_point);
}

namespace {

// Sets up the starting candidates of one group's search (docs/FORMAT.md
// section 7): rtn at storage precision (RtnStart), then each clipped range.
Status Prepare(const SearchPasses& passes, const float* x, int64_t n, int bits, Scheme scheme,
               ParamDType param_dtype, Search* search, bool anchored = false) {
  float lo = 0.0f, hi = 0.0f;
  passes.min_max(x, n, &lo, &hi);
  search->SetRange(lo, hi);
  float s0 = 1.0f, z0 = 0.0f;
  AQ_RETURN_NOT_OK(RtnFromRange(lo, hi, bits, scheme, &s0, &z0));
  search->SetRtn(s0, z0);
  const bool rep0 = RtnStart(passes, param_dtype, scheme, bits, lo, hi, &s0, &z0);
  int n_clips = 0;
  const float* clips = MseClips(bits, &n_clips);
  if (search->symmetric()) {
    const float a = std::max(std::fabs(lo), std::fabs(hi));
    search->SetCenter(0.0f);
    if (rep0) search->AddStart(s0, z0);
    if (a > 0.0f) {
      const float m_levels = static_cast<float>((1 << (bits - 1)) - 1);
      for (int k = 0; k < n_clips; ++k) {
        float s = a * clips[k] / m_levels;
        float z = search->z_sym();
        if (search->Store(&s, &z)) search->AddStart(s, z);
      }
    }
    return Status::OK();
  }
  const float r = hi - lo;
  const float mid = lo + r * 0.5f;
  search->SetCenter(mid);
  if (rep0) search->AddStart(s0, z0);
  if (hi > lo) {
    const float half = search->q_max() * 0.5f;
    for (int k = 0; k < n_clips; ++k) {
      float s = r * clips[k] / search->q_max();
      if (search->f16()) s = search->RoundScale(s);
      float z = half - mid / s;
      if (search->StoreZero(s, &z)) search->AddStart(s, z);
    }
    if (anchored) {  // float32 parameters only (stage 1 of superblock)
      for (const float c : kSuperblockAnchorClips) {
        const float s = r * c / search->q_max();
        float z_lo = -lo / s;
        if (search->StoreZero(s, &z_lo)) search->AddStart(s, z_lo);
        float z_hi = search->q_max() - hi / s;
        if (search->StoreZero(s, &z_hi)) search->AddStart(s, z_hi);
      }
    }
  }
  return Status::OK();
}

}  // namespace

Status MseGroupParamsWith(const SearchPasses& passes, const float* x, int64_t n, int bits,
                          Scheme scheme, ParamDType param_dtype, float* scale, float* zero_point) {
  Search search(passes, x, n, bits, scheme, param_dtype);
  AQ_RETURN_NOT_OK(Prepare(passes, x, n, bits, scheme, param_dtype, &search));
  search.Run();
  return search.Result(scale, zero_point);
}

namespace {

// Clamped code, + 0.0f so that a -0 (from a zero point of -0) is stored as +0.
float ClampCode(float v, float lo, float hi) { return std::min(std::max(v, lo), hi) + 0.0f; }

// One group of a super-block: its values, center and stage-1 parameters.
struct SbGroup {
  const float* x;
  int64_t n;
  float lo, hi, mid, sx;
  float s, z;   // stage 1 (float32)
  bool spread;  // the range stage 1 used is not a single value
};

// How far the code search looks around the best codes: scale code +-1,
// zero code +-kZeroCodeReach (a zero unit is finer than the spread of the
// zero points it serves, so the best zero code often moves by 2).
constexpr int kZeroCodeReach = 2;

// Stage 2 of one group (method mse): the code search under fixed units.
class CodeSearch {
 public:
  CodeSearch(const SearchPasses& p, const SbGroup& g, float d, float dz, float q_max, float p_max)
      : p_(p), g_(g), d_(d), dz_(dz), q_max_(q_max), p_max_(p_max) {}

  // The nearest codes of a float32 candidate (scale > 0, zero point finite).
  void Nearest(float s, float z, float* a, float* c) const {
    *a = ClampCode(std::nearbyint(s / d_), 1.0f, p_max_);
    *c = ClampCode(std::nearbyint(std::max(z, 0.0f) / dz_), 0.0f, p_max_);
  }

  // Evaluates (a, c) with the refit sums; keeps it when strictly better.
  void Consider(float a, float c) {
    EvalSums e;
    p_.eval_asym(g_.x, g_.n, d_ * a, dz_ * c, g_.mid, q_max_, &e);
    if (!has_best_ || e.err < best_.err) {
      has_best_ = true;
      best_ = e;
      a_ = a;
      c_ = c;
      sums_current_ = true;
    }
  }

  // The same decision from the error alone (the neighbours: most lose, and
  // the sums of one that wins are computed when a refit needs them).
  void ConsiderError(float a, float c) {
    const float err = p_.error_asym(g_.x, g_.n, d_ * a, dz_ * c, q_max_);
    if (err < best_.err) {
      best_.err = err;
      a_ = a;
      c_ = c;
      sums_current_ = false;
    }
  }

  // Least-squares refit of the best candidate's codes (float64, as the mse
  // search's refit at float32), then its nearest codes; nothing when
  // degenerate, not representable, or the same codes as the best (whose
  // error cannot be strictly smaller than itself).
  void Requant() {
    if (!sums_current_) {
      const float err = best_.err;
      p_.eval_asym(g_.x, g_.n, d_ * a_, dz_ * c_, g_.mid, q_max_, &best_);
      best_.err = err;  // the same value, from the same pass
      sums_current_ = true;
    }
    const double dn = static_cast<double>(g_.n);
    const double dsl = static_cast<double>(best_.sum_q);
    const double det = dn * static_cast<double>(best_.sum_qq) - dsl * dsl;
    if (!(det > 0.0)) return;
    const double dsx = static_cast<double>(g_.sx);
    const double s = (dn * static_cast<double>(best_.sum_xq) - dsx * dsl) / det;
    const double m = (dsx - s * dsl) / dn;
    const float s32 = static_cast<float>(s);
    if (!(s32 > 0.0f) || !std::isfinite(s32)) return;
    const float z32 =
        static_cast<float>(-(m + static_cast<double>(g_.mid)) / static_cast<double>(s32));
    if (!Representable(s32, z32)) return;
    float a = 0.0f, c = 0.0f;
    Nearest(s32, z32, &a, &c);
    if (a == a_ && c == c_) return;
    Consider(a, c);
  }

  void Run() {
    float a = 0.0f, c = 0.0f;
    Nearest(g_.s, g_.z, &a, &c);
    Consider(a, c);
    Requant();
    const float a0 = a_, c0 = c_;
    for (int da = -1; da <= 1; ++da) {
      for (int dc = -kZeroCodeReach; dc <= kZeroCodeReach; ++dc) {
        if (da == 0 && dc == 0) continue;
        const float a2 = ClampCode(a0 + static_cast<float>(da), 1.0f, p_max_);
        const float c2 = ClampCode(c0 + static_cast<float>(dc), 0.0f, p_max_);
        // A clamped neighbour equal to the best cannot be strictly better.
        if (a2 == a0 && c2 == c0) continue;
        ConsiderError(a2, c2);
      }
    }
    Requant();
  }

  float a() const { return a_; }
  float c() const { return c_; }
  float err() const { return best_.err; }

 private:
  const SearchPasses& p_;
  const SbGroup& g_;
  float d_, dz_, q_max_, p_max_;
  bool has_best_ = false;
  EvalSums best_;  // err always of (a_, c_); the sums only when sums_current_
  bool sums_current_ = false;
  float a_ = 1.0f, c_ = 0.0f;
};

// Stage 1 of one group: lo, hi, center and float32 parameters.
Status SuperblockStage1(const SearchPasses& passes, const QuantSpec& spec, SbGroup* g) {
  if (spec.method == Method::kMse) {
    // The search's own range and center (the same values as computed below).
    Search search(passes, g->x, g->n, spec.bits, Scheme::kAsymmetric, ParamDType::kF32);
    AQ_RETURN_NOT_OK(Prepare(passes, g->x, g->n, spec.bits, Scheme::kAsymmetric, ParamDType::kF32,
                             &search, /*anchored=*/true));
    search.Run();
    AQ_RETURN_NOT_OK(search.Result(&g->s, &g->z));
    g->lo = search.lo();
    g->hi = search.hi();
    g->mid = search.mid();
    g->sx = search.centered_sum();
    return Status::OK();
  }
  passes.min_max(g->x, g->n, &g->lo, &g->hi);
  g->mid = g->lo + (g->hi - g->lo) * 0.5f;
  AQ_RETURN_NOT_OK(RtnFromRange(g->lo, g->hi, spec.bits, Scheme::kAsymmetric, &g->s, &g->z));
  if (!Representable(g->s, g->z)) {
    return Status::Invalid("rtn parameters not representable (scale " + std::to_string(g->s) +
                           ", zero point " + std::to_string(g->z) + ")");
  }
  return Status::OK();
}

// Zero codes are >= 0 and share one unit per super-block, so a stage-1 zero
// point outside [0, Q] (0 outside the codes' range [-z * s, (Q - z) * s]: a
// group away from 0, or a clipped range that left 0 out) cannot be followed.
// The range is then stretched to reach 0, keeping its other end: z < 0 gives
// s = (Q - z) * s / Q, z = 0; z > Q gives s = z * s / Q, z = Q.
void WidenToZero(const QuantSpec& spec, SbGroup* g) {
  const float q_max = static_cast<float>((1 << spec.bits) - 1);
  g->spread = g->hi > g->lo;
  if (g->z < 0.0f) {
    g->s = (q_max - g->z) * g->s / q_max;
    g->z = 0.0f;
  } else if (g->z > q_max) {
    g->s = g->z * g->s / q_max;
    g->z = q_max;
  }
}

}  // namespace

namespace {

// The units of a super-block from its groups' stage-1 parameters: d from the
// largest scale of a group with a spread, dz from the largest zero point
// (each 1 when there is none). d may be inf (caller's check).
void SuperblockUnits(const SearchPasses& passes, const SbGroup* groups, int64_t count, float p_max,
                     float* d, float* dz, float* largest_scale = nullptr) {
  float s_max = 0.0f, z_max = 0.0f;
  for (int64_t k = 0; k < count; ++k) {
    if (groups[k].spread) s_max = std::max(s_max, groups[k].s);
    z_max = std::max(z_max, groups[k].z);
  }
  *d = s_max > 0.0f ? RoundScaleWith(passes, s_max / p_max) : 1.0f;
  *dz = z_max > 0.0f ? RoundScaleWith(passes, z_max / p_max) : 1.0f;
  if (largest_scale != nullptr) *largest_scale = s_max;
}

float NearestScaleCode(float s, float d, float p_max) {
  return ClampCode(std::nearbyint(s / d), 1.0f, p_max);
}
float NearestZeroCode(float z, float dz, float p_max) {
  return ClampCode(std::nearbyint(std::max(z, 0.0f) / dz), 0.0f, p_max);
}

}  // namespace

Status ChooseRowSuperblock(const SearchPasses& passes, const float* x, int64_t cols,
                           const QuantSpec& spec, float* scales, float* zero_points,
                           float* superblock_scales, float* superblock_zero_points,
                           int64_t* failed_group, uint8_t* scale_codes, uint8_t* zero_codes) {
  const int64_t g = spec.group_size;
  const int64_t G = GroupsPerRow(cols, g);
  const int64_t K = SuperblockGroups(g);
  const float q_max = static_cast<float>((1 << spec.bits) - 1);
  const float p_max = static_cast<float>((1 << SuperblockCodeBits(spec.bits)) - 1);
  const size_t slots = static_cast<size_t>(std::min(K, G));
  std::vector<SbGroup> groups(slots), rtn(slots);
  std::vector<float> a(slots), c(slots);
  for (int64_t b = 0, j0 = 0; j0 < G; ++b, j0 += K) {
    const int64_t count = std::min(K, G - j0);
    *failed_group = j0;
    for (int64_t k = 0; k < count; ++k) {
      SbGroup& gr = groups[static_cast<size_t>(k)];
      const int64_t c0 = (j0 + k) * g;
      gr.x = x + c0;
      gr.n = std::min(g, cols - c0);
      Status st = SuperblockStage1(passes, spec, &gr);
      if (!st.ok()) {
        *failed_group = j0 + k;
        return st;
      }
      WidenToZero(spec, &gr);
      gr.z = gr.z + 0.0f;  // in [0, Q]; -0 -> +0
    }
    float d = 1.0f, dz = 1.0f, s_max = 0.0f;
    SuperblockUnits(passes, groups.data(), count, p_max, &d, &dz, &s_max);
    if (!std::isfinite(d)) {
      return Status::Invalid(
          "superblock scale unit not representable in float16 (largest group "
          "scale " +
          std::to_string(s_max) + "); use float32 parameters");
    }
    if (spec.method == Method::kMse) {
      // The code search, then the rtn solution of the super-block (its own
      // units, nearest codes): whichever has the smaller total error, ties
      // to the search, so mse is never worse than rtn on any super-block.
      double err_mse = 0.0, err_rtn = 0.0;
      for (int64_t k = 0; k < count; ++k) {
        CodeSearch cs(passes, groups[static_cast<size_t>(k)], d, dz, q_max, p_max);
        cs.Run();
        a[static_cast<size_t>(k)] = cs.a();
        c[static_cast<size_t>(k)] = cs.c();
        err_mse += static_cast<double>(cs.err());
      }
      for (int64_t k = 0; k < count; ++k) {
        SbGroup& r = rtn[static_cast<size_t>(k)];
        r = groups[static_cast<size_t>(k)];
        AQ_RETURN_NOT_OK(RtnFromRange(r.lo, r.hi, spec.bits, Scheme::kAsymmetric, &r.s, &r.z));
        WidenToZero(spec, &r);
        r.z = r.z + 0.0f;
      }
      float d_r = 1.0f, dz_r = 1.0f;
      SuperblockUnits(passes, rtn.data(), count, p_max, &d_r, &dz_r);
      if (std::isfinite(d_r)) {
        for (int64_t k = 0; k < count; ++k) {
          const SbGroup& r = rtn[static_cast<size_t>(k)];
          err_rtn += static_cast<double>(
              passes.error_asym(r.x, r.n, d_r * NearestScaleCode(r.s, d_r, p_max),
                                dz_r * NearestZeroCode(r.z, dz_r, p_max), q_max));
        }
      }
      if (std::isfinite(d_r) && err_rtn < err_mse) {
        std::copy(rtn.begin(), rtn.begin() + count, groups.begin());
        d = d_r;
        dz = dz_r;
      } else {
        superblock_scales[b] = d;
        superblock_zero_points[b] = dz;
        for (int64_t k = 0; k < count; ++k) {
          const float ak = a[static_cast<size_t>(k)], ck = c[static_cast<size_t>(k)];
          scales[j0 + k] = d * ak;
          zero_points[j0 + k] = dz * ck;
          if (scale_codes) scale_codes[j0 + k] = static_cast<uint8_t>(ak);
          if (zero_codes) zero_codes[j0 + k] = static_cast<uint8_t>(ck);
        }
        continue;
      }
    }
    // Method rtn, or rtn's solution won: the nearest codes.
    superblock_scales[b] = d;
    superblock_zero_points[b] = dz;
    for (int64_t k = 0; k < count; ++k) {
      const SbGroup& gr = groups[static_cast<size_t>(k)];
      const float ak = NearestScaleCode(gr.s, d, p_max), ck = NearestZeroCode(gr.z, dz, p_max);
      scales[j0 + k] = d * ak;
      zero_points[j0 + k] = dz * ck;
      if (scale_codes) scale_codes[j0 + k] = static_cast<uint8_t>(ak);
      if (zero_codes) zero_codes[j0 + k] = static_cast<uint8_t>(ck);
    }
  }
  return Status::OK();
}

Status ChooseRowParams(const float* x, int64_t cols, const QuantSpec& spec, float* scales,
                       float* zero_points, int64_t* failed_group) {
  return ChooseRowParamsWith(BestSearchPasses(), x, cols, spec, scales, zero_points, failed_group);
}

Status ChooseRowParamsWith(const SearchPasses& passes, const float* x, int64_t cols,
                           const QuantSpec& spec, float* scales, float* zero_points,
                           int64_t* failed_group) {
  const int64_t g = spec.group_size;
  for (int64_t j = 0, c0 = 0; c0 < cols; ++j, c0 += g) {
    Status st = ChooseGroupParamsWith(passes, x + c0, std::min(g, cols - c0), spec, &scales[j],
                                      &zero_points[j]);
    if (!st.ok()) {
      *failed_group = j;
      return st;
    }
  }
  return Status::OK();
}

Status ChooseGroupParams(const float* x, int64_t n, const QuantSpec& spec, float* scale,
                         float* zero_point) {
  return ChooseGroupParamsWith(BestSearchPasses(), x, n, spec, scale, zero_point);
}

Status ChooseGroupParamsWith(const SearchPasses& passes, const float* x, int64_t n,
                             const QuantSpec& spec, float* scale, float* zero_point) {
  if (spec.param_dtype == ParamDType::kSuperblock) {  // a row at a time: ChooseRowSuperblock
    return Status::Invalid("superblock parameters are chosen per super-block, not per group");
  }
  if (spec.method == Method::kMse) {
    return MseGroupParamsWith(passes, x, n, spec.bits, spec.scheme, spec.param_dtype, scale,
                              zero_point);
  }
  return RtnStorageParamsWith(passes, x, n, spec.bits, spec.scheme, spec.param_dtype, scale,
                              zero_point);
}

}  // namespace arrowquant::kernels
