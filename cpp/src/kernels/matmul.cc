// The quantized matmul (arrowquant/matmul.h): argument checks, the driver
// that prepares x, picks GEMV or GEMM and spreads weight rows over threads,
// and the scalar reference kernels (dequantize a row, plain float32 dots).
#include "arrowquant/matmul.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "arrowquant/parallel.h"
#include "arrowquant/quantize.h"
#include "kernels/matmul_kernels.h"

namespace arrowquant {

namespace kernels {
namespace {

float ToFloat(DType dtype, const void* src, int64_t i) {
  switch (dtype) {
    case DType::kBF16:
      return BFloat16ToFloat(static_cast<const uint16_t*>(src)[i]);
    case DType::kF16:
      return HalfToFloat(static_cast<const uint16_t*>(src)[i]);
    default:
      return static_cast<const float*>(src)[i];
  }
}

uint16_t FloatToBFloat16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // nearest even
}

void ScalarLoadX(DType dtype, const void* src, const float* input_scales, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = ToFloat(dtype, src, i);
    dst[i] = input_scales ? v / input_scales[i] : v;
  }
}

void ScalarStoreY(const float* src, const void* bias, DType bias_dtype, int64_t n, DType dtype,
                  void* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = bias ? src[i] + ToFloat(bias_dtype, bias, i) : src[i];
    switch (dtype) {
      case DType::kBF16:
        static_cast<uint16_t*>(dst)[i] = FloatToBFloat16(v);
        break;
      case DType::kF16:
        static_cast<uint16_t*>(dst)[i] = FloatToHalf(v);
        break;
      default:
        static_cast<float*>(dst)[i] = v;
    }
  }
}

void ScalarRowParams(const QuantMatrix& w, int64_t r, float* scales, float* zero_points) {
  const int64_t G = GroupsPerRow(w.cols, w.group_size);
  switch (w.params) {
    case ParamStorage::kF32:
      std::memcpy(scales, static_cast<const float*>(w.scales) + r * G, G * sizeof(float));
      std::memcpy(zero_points, static_cast<const float*>(w.zero_points) + r * G, G * sizeof(float));
      return;
    case ParamStorage::kF16: {
      const auto* s = static_cast<const uint16_t*>(w.scales) + r * G;
      const auto* z = static_cast<const uint16_t*>(w.zero_points) + r * G;
      for (int64_t j = 0; j < G; ++j) {
        scales[j] = HalfToFloat(s[j]);
        zero_points[j] = HalfToFloat(z[j]);
      }
      return;
    }
    case ParamStorage::kSuperblock: {
      const int64_t K = w.superblock_groups;
      const int64_t S = (G + K - 1) / K;
      const auto* d = static_cast<const uint16_t*>(w.scales) + r * S;
      const auto* dz = static_cast<const uint16_t*>(w.zero_points) + r * S;
      for (int64_t j = 0; j < G; ++j) {
        uint32_t a = 0, c = 0;
        ReadParamCodePair(w.param_codes, r * G + j, w.param_code_bits, &a, &c);
        // Exact float32 products (FORMAT.md 9.1).
        scales[j] = HalfToFloat(d[j / K]) * static_cast<float>(a);
        zero_points[j] = HalfToFloat(dz[j / K]) * static_cast<float>(c);
      }
      return;
    }
  }
}

void ScalarDecodeRange(const QuantMatrix& w, int64_t r, const float* scales,
                       const float* zero_points, int64_t c0, int64_t c1, float* out) {
  const int bits = w.bits;
  const uint8_t* row = w.codes + r * PackedRowBytes(w.cols, bits);
  const uint8_t mask = static_cast<uint8_t>((1 << bits) - 1);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t j = c / w.group_size;
    const uint8_t q = (row[(c * bits) >> 3] >> ((c * bits) & 7)) & mask;
    out[c - c0] = (static_cast<float>(q) - zero_points[j]) * scales[j];
  }
}

size_t NoPrep(const QuantMatrix&, int64_t) { return 0; }
void NoPrepare(const QuantMatrix&, const float*, int64_t, float*) {}

// Reference: each row dequantized (exactly as Dequantize), then plain
// sequential float32 dot products with every row of x.
void ScalarRows(const QuantMatrix& w, const float* x, int64_t nb, const float*, int64_t r0,
                int64_t r1, float* y, int64_t ldy) {
  const int64_t G = GroupsPerRow(w.cols, w.group_size);
  std::vector<float> s(G), z(G), row(w.cols);
  for (int64_t r = r0; r < r1; ++r) {
    ScalarRowParams(w, r, s.data(), z.data());
    ScalarDecodeRange(w, r, s.data(), z.data(), 0, w.cols, row.data());
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + b * w.cols;
      float acc = 0.f;
      for (int64_t c = 0; c < w.cols; ++c) acc += xb[c] * row[c];
      y[b * ldy + r] = acc;
    }
  }
}

const MatmulKernels kScalarMatmul = {
    "scalar",  ScalarLoadX, ScalarStoreY,         ScalarRowParams, ScalarDecodeRange, NoPrep,
    NoPrepare, ScalarRows,  /*gemm_row_block=*/1, NoPrep,          NoPrepare,         ScalarRows,
};

}  // namespace

const MatmulKernels& ScalarMatmulKernels() { return kScalarMatmul; }

const MatmulKernels& SelectMatmul(const MatmulOptions& opt) {
  if (opt.force_scalar) return kScalarMatmul;
  if (!opt.force_avx2) {
    if (const MatmulKernels* avx512 = Avx512MatmulKernels()) return *avx512;
  }
  if (const MatmulKernels* avx2 = Avx2MatmulKernels()) return *avx2;
  return kScalarMatmul;
}

}  // namespace kernels

namespace {

bool IsActivationType(DType d) { return d == DType::kF32 || d == DType::kBF16 || d == DType::kF16; }

// Weight rows per task: enough work per task to pay a thread hand-off.
int64_t MinRowsPerTask(int64_t cols, int64_t batch, int64_t block) {
  const int64_t work = std::max<int64_t>(1, cols * std::max<int64_t>(batch, 1));
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 16) / work);
  return (rows + block - 1) / block * block;
}

}  // namespace

Status ValidateQuantMatrix(const QuantMatrix& w) {
  if (w.bits != 2 && w.bits != 4 && w.bits != 8) {
    return Status::Invalid("bits must be 2, 4 or 8, got " + std::to_string(w.bits));
  }
  if (w.group_size <= 0) {
    return Status::Invalid("group size must be positive, got " + std::to_string(w.group_size));
  }
  if (w.rows < 0 || w.cols < 0) return Status::Invalid("negative matrix dimensions");
  if (w.rows * w.cols > 0 &&
      (w.codes == nullptr || w.scales == nullptr || w.zero_points == nullptr)) {
    return Status::Invalid("null weight buffer");
  }
  if (w.params == ParamStorage::kSuperblock) {
    if (w.param_code_bits < 1 || w.param_code_bits > 8) {
      return Status::Invalid("param_code_bits must be in 1..8, got " +
                             std::to_string(w.param_code_bits));
    }
    if (w.superblock_groups < 1) {
      return Status::Invalid("superblock_groups must be >= 1, got " +
                             std::to_string(w.superblock_groups));
    }
    if (w.rows * w.cols > 0 && w.param_codes == nullptr) {
      return Status::Invalid("null param_codes for superblock parameters");
    }
  }
  return Status::OK();
}

QuantMatrixSizes QuantMatrixBufferSizes(const QuantMatrix& w) {
  QuantMatrixSizes s;
  const int64_t G = GroupsPerRow(w.cols, w.group_size);
  s.code_bytes = w.rows * PackedRowBytes(w.cols, w.bits);
  if (w.params == ParamStorage::kSuperblock) {
    const int64_t K = std::max<int64_t>(w.superblock_groups, 1);
    s.param_count = w.rows * ((G + K - 1) / K);
    s.param_code_bytes = (w.rows * G * 2 * w.param_code_bits + 7) / 8;
  } else {
    s.param_count = w.rows * G;
  }
  return s;
}

int64_t MatmulErrorTerms(int64_t cols, int64_t groups_per_row) {
  // Group sums and lane sums (<= cols additions), the per-group combination
  // (<= G), products, zero-point term and equalization (a few each), the
  // 8-lane and block reductions (<= 16): cols + G + 32 bounds every path.
  return cols + groups_per_row + 32;
}

const char* ActiveMatmulKernel() { return kernels::SelectMatmul(MatmulOptions{}).name; }

Status QuantMatmul(const QuantMatrix& w, const void* x, DType x_dtype, int64_t batch,
                   const void* bias, DType bias_dtype, void* y, const MatmulOptions& opt) {
  if (Status st = ValidateQuantMatrix(w); !st.ok()) return st;
  if (!IsActivationType(x_dtype) || (bias && !IsActivationType(bias_dtype))) {
    return Status::Invalid("activations and bias must be float32, bfloat16 or float16");
  }
  if (batch < 0) return Status::Invalid("negative batch");
  if (batch == 0 || w.rows == 0) return Status::OK();
  if ((x == nullptr && w.cols > 0) || y == nullptr) return Status::Invalid("null x or y");
  const kernels::MatmulKernels& k = kernels::SelectMatmul(opt);
  const int64_t N = w.rows, K = w.cols;

  // x' = x / s as float32 (the caller's array itself when nothing changes).
  std::vector<float> xbuf;
  const float* xf = static_cast<const float*>(x);
  if (x_dtype != DType::kF32 || w.input_scales != nullptr) {
    xbuf.resize(static_cast<size_t>(batch * K));
    const size_t item = DTypeSize(x_dtype);
    ParallelFor(batch, opt.threads,
                std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1)),
                [&](int64_t b0, int64_t b1) {
                  for (int64_t b = b0; b < b1; ++b) {
                    k.load_x(x_dtype, static_cast<const uint8_t*>(x) + b * K * item, w.input_scales,
                             K, xbuf.data() + b * K);
                  }
                });
    xf = xbuf.data();
  }

  // Float32 results (the output itself when it is float32 without bias).
  std::vector<float> ybuf;
  float* yf = static_cast<float*>(y);
  const bool direct = x_dtype == DType::kF32 && bias == nullptr;
  if (!direct) {
    ybuf.resize(static_cast<size_t>(batch * N));
    yf = ybuf.data();
  }

  const bool gemv =
      opt.path == MatmulPath::kGemv || (opt.path == MatmulPath::kAuto && batch <= kGemvMaxBatch);
  if (gemv) {
    std::vector<float> prep;
    for (int64_t b0 = 0; b0 < batch; b0 += kGemvMaxBatch) {
      const int64_t nb = std::min(kGemvMaxBatch, batch - b0);
      prep.assign(k.gemv_prep_floats(w, nb), 0.f);
      const float* xb = xf + b0 * K;
      k.gemv_prepare(w, xb, nb, prep.data());
      ParallelFor(N, opt.threads, MinRowsPerTask(K, nb, 8), [&](int64_t r0, int64_t r1) {
        k.gemv(w, xb, nb, prep.data(), r0, r1, yf + b0 * N, N);
      });
    }
  } else {
    std::vector<float> prep(k.gemm_prep_floats(w, batch));
    k.gemm_prepare(w, xf, batch, prep.data());
    const int64_t block = k.gemm_row_block;
    const int64_t blocks = (N + block - 1) / block;
    const int64_t min_blocks = std::max<int64_t>(1, MinRowsPerTask(K, batch, block) / block);
    ParallelFor(blocks, opt.threads, min_blocks, [&](int64_t p0, int64_t p1) {
      k.gemm(w, xf, batch, prep.data(), p0 * block, std::min(N, p1 * block), yf, N);
    });
  }

  if (!direct) {
    const size_t item = DTypeSize(x_dtype);
    ParallelFor(batch, opt.threads, std::max<int64_t>(1, (int64_t{1} << 16) / N),
                [&](int64_t b0, int64_t b1) {
                  for (int64_t b = b0; b < b1; ++b) {
                    k.store_y(yf + b * N, bias, bias_dtype, N, x_dtype,
                              static_cast<uint8_t*>(y) + b * N * item);
                  }
                });
  }
  return Status::OK();
}

namespace {

// Rows row_of(i), i in [0, n), dequantized into out row i.
template <typename RowOf>
void DequantizeRowList(const QuantMatrix& w, int64_t n, const RowOf& row_of, float* out,
                       const MatmulOptions& opt) {
  const kernels::MatmulKernels& k = kernels::SelectMatmul(opt);
  const int64_t G = GroupsPerRow(w.cols, w.group_size);
  ParallelFor(n, opt.threads, std::max<int64_t>(1, (int64_t{1} << 15) / w.cols),
              [&](int64_t a, int64_t b) {
                std::vector<float> s(G), z(G);
                for (int64_t i = a; i < b; ++i) {
                  const int64_t r = row_of(i);
                  float* o = out + i * w.cols;
                  k.row_params(w, r, s.data(), z.data());
                  k.decode_range(w, r, s.data(), z.data(), 0, w.cols, o);
                  if (w.input_scales != nullptr) {
                    for (int64_t c = 0; c < w.cols; ++c) o[c] /= w.input_scales[c];
                  }
                }
              });
}

}  // namespace

Status DequantizeMatrixRows(const QuantMatrix& w, int64_t row_begin, int64_t row_end, float* out,
                            const MatmulOptions& opt) {
  if (Status st = ValidateQuantMatrix(w); !st.ok()) return st;
  if (row_begin < 0 || row_end > w.rows || row_begin > row_end) {
    return Status::Invalid("rows [" + std::to_string(row_begin) + ", " + std::to_string(row_end) +
                           ") outside the matrix's " + std::to_string(w.rows));
  }
  if (row_end == row_begin || w.cols == 0) return Status::OK();
  if (out == nullptr) return Status::Invalid("null output");
  DequantizeRowList(
      w, row_end - row_begin, [&](int64_t i) { return row_begin + i; }, out, opt);
  return Status::OK();
}

Status DequantizeMatrixGather(const QuantMatrix& w, const int64_t* ids, int64_t n, float* out,
                              const MatmulOptions& opt) {
  if (Status st = ValidateQuantMatrix(w); !st.ok()) return st;
  if (n < 0) return Status::Invalid("negative id count");
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= w.rows) {
      return Status::Invalid("index " + std::to_string(ids[i]) + " at position " +
                             std::to_string(i) + " is outside 0.." + std::to_string(w.rows - 1));
    }
  }
  if (n == 0 || w.cols == 0) return Status::OK();
  if (out == nullptr) return Status::Invalid("null output");
  DequantizeRowList(
      w, n, [&](int64_t i) { return ids[i]; }, out, opt);
  return Status::OK();
}

}  // namespace arrowquant
