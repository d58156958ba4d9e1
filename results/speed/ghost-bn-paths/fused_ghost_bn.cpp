// Ghost batch norm for bfloat16 channels_last CPU tensors in two fused passes per
// direction: every group of images is one task of at::parallel_for, its per-channel sums
// kept in float32. A prototype measured by run.py beside it; the project does not use it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>

static inline float to_float(uint16_t bits) {
  uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, 4);
  return value;
}

static inline uint16_t to_bfloat16(float value) {  // round to nearest even (no NaN in play)
  uint32_t wide;
  std::memcpy(&wide, &value, 4);
  wide += 0x7fffu + ((wide >> 16) & 1u);
  return uint16_t(wide >> 16);
}

static const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }

// x: (N, C, H, W) bfloat16 channels_last, so each group of N / groups images is a block of
// `rows` rows of C channels. Returns the output and each group's mean and 1/std, (groups, C).
std::vector<at::Tensor> forward(at::Tensor x, at::Tensor weight, at::Tensor bias, int64_t groups,
                                double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous(at::MemoryFormat::ChannelsLast));
  const int64_t C = x.size(1), rows = x.size(0) / groups * x.size(2) * x.size(3);
  auto out = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto mean = at::empty({groups, C}, x.options().dtype(at::kFloat)), rstd = at::empty_like(mean);
  const float *w = weight.data_ptr<float>(), *b = bias.data_ptr<float>();
  at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
    std::vector<float> sum(C), scale(C), shift(C);
    for (int64_t g = first; g < last; ++g) {
      const uint16_t* in = bits(x) + g * rows * C;
      uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr()) + g * rows * C;
      float *m = mean.data_ptr<float>() + g * C, *r = rstd.data_ptr<float>() + g * C;
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t i = 0; i < rows * C; i += C)
        for (int64_t c = 0; c < C; ++c) sum[c] += to_float(in[i + c]);
      for (int64_t c = 0; c < C; ++c) { m[c] = sum[c] / rows; sum[c] = 0.f; }
      for (int64_t i = 0; i < rows * C; i += C)  // the variance about the mean: no cancellation
        for (int64_t c = 0; c < C; ++c) { float d = to_float(in[i + c]) - m[c]; sum[c] += d * d; }
      for (int64_t c = 0; c < C; ++c) {
        r[c] = 1.f / std::sqrt(sum[c] / rows + float(eps));
        scale[c] = w[c] * r[c];
        shift[c] = b[c] - m[c] * scale[c];
      }
      for (int64_t i = 0; i < rows * C; i += C)
        for (int64_t c = 0; c < C; ++c) o[i + c] = to_bfloat16(to_float(in[i + c]) * scale[c] + shift[c]);
    }
  });
  return {out, mean, rstd};
}

// The gradients of x, weight and bias from that of the output.
std::vector<at::Tensor> backward(at::Tensor grad_out, at::Tensor x, at::Tensor mean, at::Tensor rstd,
                                 at::Tensor weight, int64_t groups) {
  grad_out = grad_out.to(at::kBFloat16).contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t C = x.size(1), rows = x.size(0) / groups * x.size(2) * x.size(3);
  auto grad_x = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto grad_bias = at::empty({groups, C}, mean.options()), grad_weight = at::empty_like(grad_bias);
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
    std::vector<float> scale(C), dy_mean(C), dy_xhat_mean(C);
    for (int64_t g = first; g < last; ++g) {
      const uint16_t *in = bits(x) + g * rows * C, *dy = bits(grad_out) + g * rows * C;
      uint16_t* dx = reinterpret_cast<uint16_t*>(grad_x.data_ptr()) + g * rows * C;
      const float *m = mean.data_ptr<float>() + g * C, *r = rstd.data_ptr<float>() + g * C;
      float *db = grad_bias.data_ptr<float>() + g * C, *dw = grad_weight.data_ptr<float>() + g * C;
      for (int64_t c = 0; c < C; ++c) { db[c] = 0.f; dw[c] = 0.f; }
      for (int64_t i = 0; i < rows * C; i += C)
        for (int64_t c = 0; c < C; ++c) {
          float d = to_float(dy[i + c]);
          db[c] += d;
          dw[c] += d * (to_float(in[i + c]) - m[c]);
        }
      for (int64_t c = 0; c < C; ++c) {
        dw[c] *= r[c];  // now the sum of dy * x_hat
        scale[c] = w[c] * r[c];
        dy_mean[c] = db[c] / rows;
        dy_xhat_mean[c] = dw[c] / rows * r[c];
      }
      for (int64_t i = 0; i < rows * C; i += C)
        for (int64_t c = 0; c < C; ++c)
          dx[i + c] = to_bfloat16(scale[c] * (to_float(dy[i + c]) - dy_mean[c]
                                              - (to_float(in[i + c]) - m[c]) * dy_xhat_mean[c]));
    }
  });
  return {grad_x, grad_weight.sum(0), grad_bias.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
