// Fused CPU kernel for the per-edge part of the CGCNN gated convolution.
//
// For every edge e = (i -> j) of centre atom i, with C = 2a channels:
//   z[e]  = edge[idx[e]] + nbr[j] + self[i]          (the split fc_full, see model.py)
//   zn[e] = z[e] * scale + shift                      (bn1 as an affine map per channel)
//   out[i] = sum_e sigmoid(zn[e, :a]) * softplus(zn[e, a:])
// In training, scale and shift come from the batch statistics of z, which edge_stats
// computes. The unfused path writes and re-reads (E, C) tensors about fifteen times per
// layer (the gather, batch norm, sigmoid, softplus, product, sum and their backward); here
// each pass reads the small per-atom and per-distance tables and keeps an edge in registers;
// the only (E, C) tensor is the forward's local derivatives, which spare the backward all
// transcendental functions.
//
// Edges must be grouped by centre atom: offsets (N+1) gives each atom's edge range, so
// the per-atom sums need no atomics. Gradients that scatter to neighbours and distances
// go to per-thread buffers, summed at the end.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// exp arguments are clamped so that no result is subnormal or infinite: sigmoid and
// softplus differ from the exact values by < 2e-38 there (torch's own softplus returns x
// above 20, as here).
constexpr float kExpMin = -87.0f;
constexpr float kExpMax = 87.0f;
constexpr float kSoftplusThreshold = 20.0f;

struct Tables {
  const float* edge;
  const float* nbr;
  const float* self;
  const int64_t* idx;  // nullptr: edge row e for edge e
  const int64_t* dst;
  const int64_t* offsets;
  int64_t channels;
};

Tables tables_of(const at::Tensor& edge, const at::Tensor& nbr, const at::Tensor& self,
                 const at::Tensor& idx, const at::Tensor& dst, const at::Tensor& offsets) {
  TORCH_CHECK(edge.scalar_type() == at::kFloat && nbr.scalar_type() == at::kFloat &&
                  self.scalar_type() == at::kFloat,
              "edge_gate: float32 tables expected");
  TORCH_CHECK(edge.is_contiguous() && nbr.is_contiguous() && self.is_contiguous(),
              "edge_gate: contiguous tables expected");
  TORCH_CHECK(dst.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong,
              "edge_gate: int64 indices expected");
  TORCH_CHECK(nbr.size(1) == self.size(1) && edge.size(1) == self.size(1) &&
                  self.size(1) % 2 == 0,
              "edge_gate: tables must share an even channel count");
  TORCH_CHECK(offsets.numel() == self.size(0) + 1, "edge_gate: offsets must have N+1 entries");
  return Tables{edge.data_ptr<float>(),
                nbr.data_ptr<float>(),
                self.data_ptr<float>(),
                idx.numel() ? idx.data_ptr<int64_t>() : nullptr,
                dst.data_ptr<int64_t>(),
                offsets.data_ptr<int64_t>(),
                self.size(1)};
}

// z of one edge into zbuf (C floats), summed in the order of the unfused path
inline void edge_z(const Tables& t, int64_t i, int64_t e, float* __restrict zbuf) {
  const int64_t c = t.channels;
  const float* __restrict u = t.edge + (t.idx ? t.idx[e] : e) * c;
  const float* __restrict n = t.nbr + t.dst[e] * c;
  const float* __restrict s = t.self + i * c;
  for (int64_t k = 0; k < c; ++k) zbuf[k] = (u[k] + n[k]) + s[k];
}

inline float clamp_exp_arg(float x) { return std::min(std::max(x, kExpMin), kExpMax); }

// exp(x) for softplus, with x limited to [kExpMin, kSoftplusThreshold]
inline float softplus_exp(float x) { return std::exp(std::min(std::max(x, kExpMin), kSoftplusThreshold)); }

// torch's softplus: log1p(exp(x)), or x above the threshold. Written without a branch or a
// select (either made g++ call libmvec per lane: 2.5x slower): above the threshold
// log1p(exp(20)) rounds to 20 in float32, and the excess is added back.
inline float softplus_of(float x, float ex) {
  return std::log1p(ex) + std::max(x - kSoftplusThreshold, 0.0f);
}

// acc[k] += sigmoid(zn[k]) * softplus(zn[k + a]), zn = z * scale + shift; with `local`, also
// the local derivatives of that product (see edge_gate_forward). A function of its own, with
// restrict pointers, so that g++ vectorises it (exp and log1p from glibc's libmvec).
inline void gate_message(const float* __restrict z, const float* __restrict sc,
                         const float* __restrict sh, int64_t a, float* __restrict acc,
                         float* __restrict local) {
  if (local) {
#pragma GCC ivdep
    for (int64_t k = 0; k < a; ++k) {
      const float zf = z[k] * sc[k] + sh[k];
      const float zc = z[k + a] * sc[k + a] + sh[k + a];
      const float sig = 1.0f / (1.0f + std::exp(-clamp_exp_arg(zf)));
      const float ez = softplus_exp(zc);
      const float soft = softplus_of(zc, ez);
      acc[k] += sig * soft;
      local[k] = soft * sig * (1.0f - sig);
      // softplus' = sigmoid; above the threshold exp(20) / (exp(20) + 1) is 1 in float32
      local[k + a] = sig * (ez / (ez + 1.0f));
    }
  } else {
#pragma GCC ivdep
    for (int64_t k = 0; k < a; ++k) {
      const float zf = z[k] * sc[k] + sh[k];
      const float zc = z[k + a] * sc[k + a] + sh[k + a];
      const float sig = 1.0f / (1.0f + std::exp(-clamp_exp_arg(zf)));
      acc[k] += sig * softplus_of(zc, softplus_exp(zc));
    }
  }
}

// Rows of per-thread sums (n_threads x width) added up.
std::vector<double> sum_over_threads(const std::vector<double>& sums, int n_threads, int64_t width) {
  std::vector<double> total(width, 0.0);
  for (int th = 0; th < n_threads; ++th)
    for (int64_t k = 0; k < width; ++k) total[k] += sums[static_cast<size_t>(th) * width + k];
  return total;
}

// Per channel sum and sum of squares of z over all edges (float64).
std::vector<at::Tensor> edge_stats(const at::Tensor& edge, const at::Tensor& nbr,
                                   const at::Tensor& self, const at::Tensor& idx,
                                   const at::Tensor& dst, const at::Tensor& offsets) {
  const Tables t = tables_of(edge, nbr, self, idx, dst, offsets);
  const int64_t n_atoms = self.size(0), c = t.channels;
  const int n_threads = at::get_num_threads();
  std::vector<double> sums(static_cast<size_t>(n_threads) * 2 * c, 0.0);
  at::parallel_for(0, n_atoms, 64, [&](int64_t begin, int64_t end) {
    double* __restrict sum = sums.data() + static_cast<size_t>(at::get_thread_num()) * 2 * c;
    double* __restrict sq = sum + c;
    std::vector<float> zbuf(c), atom_sum(c), atom_sq(c);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(atom_sum.begin(), atom_sum.end(), 0.0f);
      std::fill(atom_sq.begin(), atom_sq.end(), 0.0f);
      for (int64_t e = t.offsets[i]; e < t.offsets[i + 1]; ++e) {
        edge_z(t, i, e, zbuf.data());
        for (int64_t k = 0; k < c; ++k) {
          atom_sum[k] += zbuf[k];
          atom_sq[k] += zbuf[k] * zbuf[k];
        }
      }
      for (int64_t k = 0; k < c; ++k) {
        sum[k] += atom_sum[k];
        sq[k] += atom_sq[k];
      }
    }
  });
  const std::vector<double> total = sum_over_threads(sums, n_threads, 2 * c);
  auto out = at::empty({2, c}, at::TensorOptions().dtype(at::kDouble));
  std::copy(total.begin(), total.end(), out.data_ptr<double>());
  return {out[0], out[1]};
}

// out[i] = sum over i's edges of sigmoid(zn_filter) * softplus(zn_core), zn = z*scale + shift.
// With `with_grad`, also returns the local derivatives of every edge's message, (E, C):
// [:, :a] = d msg / d zn_filter and [:, a:] = d msg / d zn_core (msg = sigmoid * softplus,
// channel by channel), so that the backward needs no transcendental function; without it,
// an empty tensor.
std::vector<at::Tensor> edge_gate_forward(const at::Tensor& edge, const at::Tensor& nbr,
                                          const at::Tensor& self, const at::Tensor& idx,
                                          const at::Tensor& dst, const at::Tensor& offsets,
                                          const at::Tensor& scale, const at::Tensor& shift,
                                          bool with_grad) {
  const Tables t = tables_of(edge, nbr, self, idx, dst, offsets);
  const int64_t n_atoms = self.size(0), c = t.channels, a = c / 2;
  const int64_t n_edges = t.offsets[n_atoms];
  auto out = at::empty({n_atoms, a}, self.options());
  auto local = at::empty({with_grad ? n_edges : 0, c}, self.options());
  float* __restrict o = out.data_ptr<float>();
  float* local_base = local.data_ptr<float>();
  const float* __restrict sc = scale.data_ptr<float>();
  const float* __restrict sh = shift.data_ptr<float>();
  at::parallel_for(0, n_atoms, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> zbuf(c);
    float* __restrict z = zbuf.data();
    for (int64_t i = begin; i < end; ++i) {
      float* __restrict acc = o + i * a;
      std::fill(acc, acc + a, 0.0f);
      for (int64_t e = t.offsets[i]; e < t.offsets[i + 1]; ++e) {
        edge_z(t, i, e, z);
        gate_message(z, sc, sh, a, acc, with_grad ? local_base + e * c : nullptr);
      }
    }
  });
  return {out, local};
}

// Backward of edge_gate_forward (its `local` derivatives) with scale/shift from bn1. With
// `training`, bn1 used the batch statistics (mean, invstd), whose own gradient enters dz as
// in torch's batch norm. Returns d_edge, d_nbr, d_self, d_weight, d_bias (bn1's weight, bias).
std::vector<at::Tensor> edge_gate_backward(
    const at::Tensor& grad_out, const at::Tensor& local, const at::Tensor& edge,
    const at::Tensor& nbr, const at::Tensor& self, const at::Tensor& idx, const at::Tensor& dst,
    const at::Tensor& offsets, const at::Tensor& scale, const at::Tensor& mean,
    const at::Tensor& invstd, bool training) {
  const Tables t = tables_of(edge, nbr, self, idx, dst, offsets);
  const int64_t n_atoms = self.size(0), c = t.channels, a = c / 2;
  const int64_t n_rows = edge.size(0);
  const int64_t n_edges = t.offsets[n_atoms];
  TORCH_CHECK(local.size(0) == n_edges && local.size(1) == c && local.is_contiguous(),
              "edge_gate: local derivatives of every edge expected");
  auto go_c = grad_out.contiguous();
  const float* __restrict go = go_c.data_ptr<float>();
  const float* __restrict dl = local.data_ptr<float>();
  const float* __restrict sc = scale.data_ptr<float>();
  const float* __restrict mu = mean.data_ptr<float>();
  const float* __restrict is = invstd.data_ptr<float>();
  const int n_threads = at::get_num_threads();

  // g = dL/dzn of edge e (C floats)
  auto gate_grad = [&](int64_t i, int64_t e, float* __restrict g) {
    const float* __restrict goi = go + i * a;
    const float* __restrict d = dl + e * c;
    for (int64_t k = 0; k < a; ++k) {
      g[k] = goi[k] * d[k];
      g[k + a] = goi[k] * d[k + a];
    }
  };

  // pass 1: sums over edges of g and g * xhat (bn1's bias and weight gradients)
  std::vector<double> sums(static_cast<size_t>(n_threads) * 2 * c, 0.0);
  at::parallel_for(0, n_atoms, 64, [&](int64_t begin, int64_t end) {
    double* __restrict sg = sums.data() + static_cast<size_t>(at::get_thread_num()) * 2 * c;
    double* __restrict sgx = sg + c;
    std::vector<float> zbuf(c), gbuf(c), atom_g(c), atom_gx(c);
    float* __restrict z = zbuf.data();
    float* __restrict g = gbuf.data();
    for (int64_t i = begin; i < end; ++i) {
      std::fill(atom_g.begin(), atom_g.end(), 0.0f);
      std::fill(atom_gx.begin(), atom_gx.end(), 0.0f);
      for (int64_t e = t.offsets[i]; e < t.offsets[i + 1]; ++e) {
        edge_z(t, i, e, z);
        gate_grad(i, e, g);
        for (int64_t k = 0; k < c; ++k) {
          atom_g[k] += g[k];
          atom_gx[k] += g[k] * ((z[k] - mu[k]) * is[k]);
        }
      }
      for (int64_t k = 0; k < c; ++k) {
        sg[k] += atom_g[k];
        sgx[k] += atom_gx[k];
      }
    }
  });
  const std::vector<double> total = sum_over_threads(sums, n_threads, 2 * c);
  const double* sum_g = total.data();
  const double* sum_gx = total.data() + c;
  auto fopts = self.options();
  auto d_weight = at::empty({c}, fopts), d_bias = at::empty({c}, fopts);
  // dz = scale * (g - mean(g) - xhat * mean(g * xhat)) in training, scale * g otherwise
  std::vector<float> mean_g(c, 0.0f), mean_gx(c, 0.0f);
  for (int64_t k = 0; k < c; ++k) {
    d_bias.data_ptr<float>()[k] = static_cast<float>(sum_g[k]);
    d_weight.data_ptr<float>()[k] = static_cast<float>(sum_gx[k]);
    if (training && n_edges > 0) {
      mean_g[k] = static_cast<float>(sum_g[k] / n_edges);
      mean_gx[k] = static_cast<float>(sum_gx[k] / n_edges);
    }
  }

  // pass 2: dz per edge, summed into its centre (own rows), neighbour and distance rows
  // (per-thread buffers: other threads' edges reach the same rows)
  auto d_self = at::empty({n_atoms, c}, fopts);
  auto nbr_buf = at::zeros({n_threads, n_atoms, c}, fopts);
  // without idx every edge has its own row: no two threads write the same one
  const bool own_rows = t.idx == nullptr;
  auto edge_buf = at::zeros({own_rows ? 1 : n_threads, n_rows, c}, fopts);
  float* __restrict ds = d_self.data_ptr<float>();
  float* nb = nbr_buf.data_ptr<float>();
  float* eb = edge_buf.data_ptr<float>();
  const float* __restrict mg = mean_g.data();
  const float* __restrict mgx = mean_gx.data();
  at::parallel_for(0, n_atoms, 64, [&](int64_t begin, int64_t end) {
    const int64_t th = at::get_thread_num();
    float* __restrict d_nbr_th = nb + th * n_atoms * c;
    float* __restrict d_edge_th = eb + (own_rows ? 0 : th) * n_rows * c;
    std::vector<float> zbuf(c), gbuf(c);
    float* __restrict z = zbuf.data();
    float* __restrict g = gbuf.data();
    for (int64_t i = begin; i < end; ++i) {
      float* __restrict dsi = ds + i * c;
      std::fill(dsi, dsi + c, 0.0f);
      for (int64_t e = t.offsets[i]; e < t.offsets[i + 1]; ++e) {
        edge_z(t, i, e, z);
        gate_grad(i, e, g);
        float* __restrict dn = d_nbr_th + t.dst[e] * c;
        float* __restrict du = d_edge_th + (t.idx ? t.idx[e] : e) * c;
        // the three rows are in different buffers (or a centre's own row): no overlap
#pragma GCC ivdep
        for (int64_t k = 0; k < c; ++k) {
          const float xhat = (z[k] - mu[k]) * is[k];
          const float dz = sc[k] * (g[k] - mg[k] - xhat * mgx[k]);
          dsi[k] += dz;
          dn[k] += dz;
          du[k] += dz;
        }
      }
    }
  });
  return {edge_buf.sum(0), nbr_buf.sum(0), d_self, d_weight, d_bias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("edge_stats", &edge_stats, "per-channel sum and sum of squares of z over edges");
  m.def("forward", &edge_gate_forward, "fused gated message sum");
  m.def("backward", &edge_gate_backward, "backward of the fused gated message sum");
}
