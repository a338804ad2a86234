#pragma once
// GPU-only: the experts' grouped GEMMs on tensor cores (WMMA, bf16/fp16 operands, fp32
// accumulation), without host synchronisation: tiles never straddle two experts, and the grid is
// the upper bound ceil(S/BM) + E row tiles; tiles past the data exit at once.
//
//   row_gemm_tc:   C = A[rows]·B_g (+ bias_g), the RowGemm contract (forward GEMMs, dh, dxs)
//   outer_sum_tc:  D_g += A[rows of g]ᵀ·G[rows of g], the GroupedOuterSum contract (weight gradients)
//
// Their portable twins are RowGemm and GroupedOuterSum (cuda/grouped_gemm.cuh): the emulated build
// runs those instead, and the GPU tests compare the two (GemmPath::portable forces the twins).
// Accumulation order differs from the twins (per 32-deep K step), so results agree to rounding.
#include <cstdint>

#include "smoe/cuda/grouped_gemm.cuh"

#if !defined(SMOE_CUDA_EMULATION)
#include <mma.h>
#endif

namespace smoe::cuda_kernels {

// Which GEMM implementation the experts use on a GPU: the tensor-core kernels where they apply
// (bf16/fp16 operands), or always the portable functors (the reference the kernels are tested with).
enum class GemmPath { fastest, portable };

template <class T>
inline constexpr bool tensor_core_type_v = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

// tile_offsets[e+1] = Σ_{e' <= e} ceil(count_e' / rows_per_tile): the row tiles of each expert.
struct TileOffsets {
  const std::int32_t* offsets;
  std::int32_t* tile_offsets;
  index_t experts, rows_per_tile;
  SMOE_HOST_DEVICE void operator()(index_t) const {
    std::int32_t total = 0;
    tile_offsets[0] = 0;
    for (index_t e = 0; e < experts; ++e) {
      const std::int32_t count = offsets[e + 1] - offsets[e];
      total += static_cast<std::int32_t>((count + rows_per_tile - 1) / rows_per_tile);
      tile_offsets[e + 1] = total;
    }
  }
};

#if !defined(SMOE_CUDA_EMULATION)
namespace tc {

inline constexpr int BM = 64, BN = 128, BK = 32, threads = 256;  // 8 warps as 2 (M) x 4 (N), 32x32 each
inline constexpr int pad = 8;                                    // 16 bytes: keeps WMMA pointers aligned
inline constexpr int a_bytes = BM * (BK + pad) * 2;
inline constexpr int b_bytes = (BN * (BK + pad) > BK * (BN + pad) ? BN * (BK + pad) : BK * (BN + pad)) * 2;
inline constexpr int c_bytes = BM * (BN + 4) * 4;
inline constexpr int smem_bytes = c_bytes > a_bytes + b_bytes ? c_bytes : a_bytes + b_bytes;

template <class T>
__device__ inline T zero() {
  return from_acc<T>(0.0f);
}

// 8 consecutive T from p (16 bytes) when aligned and in range, else element by element with
// zeros past `valid`.
template <class T>
__device__ inline void load8(const T* p, int valid, bool aligned, T* out) {
  if (valid >= 8 && aligned) {
    *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(p);
  } else {
    for (int i = 0; i < 8; ++i) out[i] = i < valid ? p[i] : zero<T>();
  }
}

// Row tile `tile` → its expert and rows [row0, row_end) (tile_offsets as TileOffsets builds them).
__device__ inline bool locate_tile(const std::int32_t* offsets, const std::int32_t* tile_offsets, index_t E, int tile,
                                   int& e, index_t& row0, index_t& row_end) {
  if (tile >= tile_offsets[E]) return false;
  int lo = 0, hi = static_cast<int>(E);  // largest e with tile_offsets[e] <= tile
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (tile_offsets[mid] <= tile) lo = mid; else hi = mid;
  }
  e = lo;
  row0 = offsets[e] + index_t(tile - tile_offsets[e]) * BM;
  row_end = offsets[e + 1] < row0 + BM ? offsets[e + 1] : row0 + BM;
  return true;
}

// C[r, n] (+)= Σ_k A[row(r), k]·B_e[k, n] (+ bias_e[n]) for the rows of one expert tile.
// B_e is read through its strides: n-major (col_stride 1) or k-major (row_stride 1).
template <class T, class TC, bool b_kmajor>
__global__ void __launch_bounds__(threads) row_gemm_kernel(RowGemm<T, T, TC> p, const std::int32_t* offsets,
                                                          const std::int32_t* tile_offsets, index_t E) {
  using namespace nvcuda;
  __shared__ __align__(128) unsigned char smem[smem_bytes];
  T* As = reinterpret_cast<T*>(smem);                // [BM][BK + pad]
  T* Bs = reinterpret_cast<T*>(smem + a_bytes);      // [BK][BN + pad] or, k-major, [BN][BK + pad]
  float* Cs = reinterpret_cast<float*>(smem);        // [BM][BN + 4], after the K loop
  int e;
  index_t row0, row_end;
  if (!locate_tile(offsets, tile_offsets, E, blockIdx.x, e, row0, row_end)) return;
  const index_t n0 = index_t(blockIdx.y) * BN, K = p.K, N = p.N;
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 4, wn = warp % 4;
  const T* B = p.b.data + e * p.b.group_stride;
  const bool a_aligned = p.lda % 8 == 0 && reinterpret_cast<std::uintptr_t>(p.a) % 16 == 0;
  const bool b_aligned = (b_kmajor ? p.b.col_stride : p.b.row_stride) % 8 == 0 &&
                         reinterpret_cast<std::uintptr_t>(B) % 16 == 0;

  using Layout = std::conditional_t<b_kmajor, wmma::col_major, wmma::row_major>;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (auto& row : acc)
    for (auto& f : row) wmma::fill_fragment(f, 0.0f);

  for (index_t k0 = 0; k0 < K; k0 += BK) {
    {  // A: BM rows x BK, one 8-wide vector per thread
      const int r = tid / 4, c = (tid % 4) * 8;
      const index_t row = row0 + r;
      T v[8];
      if (row < row_end) {
        const index_t src = p.a_row ? p.a_row[row] : row;
        load8(p.a + src * p.lda + k0 + c, int(K - k0 - c), a_aligned, v);
      } else {
        for (auto& x : v) x = zero<T>();
      }
      for (int i = 0; i < 8; ++i) As[r * (BK + pad) + c + i] = v[i];
    }
    if constexpr (!b_kmajor) {  // B: BK x BN, contiguous along n
      for (int i = tid; i < BK * BN / 8; i += threads) {
        const int kk = i / (BN / 8), c = (i % (BN / 8)) * 8;
        T v[8];
        const index_t k = k0 + kk, n = n0 + c;
        if (k < K && n < N)
          load8(B + k * p.b.row_stride + n, int(N - n), b_aligned, v);
        else
          for (auto& x : v) x = zero<T>();
        for (int j = 0; j < 8; ++j) Bs[kk * (BN + pad) + c + j] = v[j];
      }
    } else {  // B: BN x BK, contiguous along k (B(k, n) = B[n·col_stride + k])
      for (int i = tid; i < BN * BK / 8; i += threads) {
        const int nn = i / (BK / 8), c = (i % (BK / 8)) * 8;
        T v[8];
        const index_t k = k0 + c, n = n0 + nn;
        if (k < K && n < N)
          load8(B + n * p.b.col_stride + k, int(K - k), b_aligned, v);
        else
          for (auto& x : v) x = zero<T>();
        for (int j = 0; j < 8; ++j) Bs[nn * (BK + pad) + c + j] = v[j];
      }
    }
    __syncthreads();
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout> b[2];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * (BK + pad) + kk, BK + pad);
      for (int j = 0; j < 2; ++j) {
        const int n = wn * 32 + j * 16;
        if constexpr (b_kmajor)
          wmma::load_matrix_sync(b[j], Bs + n * (BK + pad) + kk, BK + pad);
        else
          wmma::load_matrix_sync(b[j], Bs + kk * (BN + pad) + n, BN + pad);
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * (BN + 4) + wn * 32 + j * 16, acc[i][j], BN + 4,
                              wmma::mem_row_major);
  __syncthreads();
  for (int i = tid; i < BM * BN; i += threads) {
    const int r = i / BN, c = i % BN;
    const index_t row = row0 + r, n = n0 + c;
    if (row >= row_end || n >= N) continue;
    float v = Cs[r * (BN + 4) + c];
    if (p.bias) v += to_acc(p.bias[e * p.bias_stride + n]);
    TC& out = p.c[row * p.ldc + n];
    out = from_acc<TC>(p.accumulate ? to_acc(out) + v : v);
  }
}

// D_e[i, j] += Σ_{r in expert e} A[row(r), i]·G[r, j]: one (BM x BN) tile of D_e per block, the
// expert's rows in BK chunks (in order: deterministic).
template <class T>
__global__ void __launch_bounds__(threads) outer_sum_kernel(GroupedOuterSum<T, T, T> p, index_t tiles_j) {
  using namespace nvcuda;
  __shared__ __align__(128) unsigned char smem[smem_bytes];
  T* As = reinterpret_cast<T*>(smem);            // [BK][BM + pad]: A chunk, read as col-major Aᵀ
  T* Gs = reinterpret_cast<T*>(smem + BK * (BM + pad) * 2);  // [BK][BN + pad]
  float* Cs = reinterpret_cast<float*>(smem);    // [BM][BN + 4]
  const index_t e = blockIdx.y;
  const index_t i0 = index_t(blockIdx.x / tiles_j) * BM, j0 = index_t(blockIdx.x % tiles_j) * BN;
  const index_t begin = p.offsets[e], end = p.offsets[e + 1];
  if (begin == end) return;
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 4, wn = warp % 4;
  const bool a_aligned = p.lda % 8 == 0 && reinterpret_cast<std::uintptr_t>(p.a) % 16 == 0;
  const bool g_aligned = p.ldg % 8 == 0 && reinterpret_cast<std::uintptr_t>(p.g) % 16 == 0;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (auto& row : acc)
    for (auto& f : row) wmma::fill_fragment(f, 0.0f);
  for (index_t r0 = begin; r0 < end; r0 += BK) {
    for (int t = tid; t < BK * BM / 8; t += threads) {  // A rows r0.., columns i0.. (8 per thread)
      const int rr = t / (BM / 8), c = (t % (BM / 8)) * 8;
      const index_t r = r0 + rr, i = i0 + c;
      T v[8];
      if (r < end && i < p.I)
        load8(p.a + (p.a_row ? p.a_row[r] : r) * p.lda + i, int(p.I - i), a_aligned, v);
      else
        for (auto& x : v) x = zero<T>();
      for (int j = 0; j < 8; ++j) As[rr * (BM + pad) + c + j] = v[j];
    }
    for (int t = tid; t < BK * BN / 8; t += threads) {  // G rows r0.., columns j0..
      const int rr = t / (BN / 8), c = (t % (BN / 8)) * 8;
      const index_t r = r0 + rr, j = j0 + c;
      T v[8];
      if (r < end && j < p.J)
        load8(p.g + r * p.ldg + j, int(p.J - j), g_aligned, v);
      else
        for (auto& x : v) x = zero<T>();
      for (int jj = 0; jj < 8; ++jj) Gs[rr * (BN + pad) + c + jj] = v[jj];
    }
    __syncthreads();
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a[2];  // Aᵀ(i, r) = As[r][i]
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + kk * (BM + pad) + wm * 32 + i * 16, BM + pad);
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Gs + kk * (BN + pad) + wn * 32 + j * 16, BN + pad);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * (BN + 4) + wn * 32 + j * 16, acc[i][j], BN + 4,
                              wmma::mem_row_major);
  __syncthreads();
  T* D = p.d + e * p.I * p.J;
  for (int t = tid; t < BM * BN; t += threads) {
    const int r = t / BN, c = t % BN;
    const index_t i = i0 + r, j = j0 + c;
    if (i >= p.I || j >= p.J) continue;
    D[i * p.J + j] = from_acc<T>(to_acc(D[i * p.J + j]) + Cs[r * (BN + 4) + c]);
  }
}

}  // namespace tc
#endif

// RowGemm over S dispatch slots grouped by `offsets` (E experts): tensor cores for bf16/fp16 on the
// GPU, else (and with GemmPath::portable, and in the emulated build) the portable functor.
// `tile_offsets` is [E + 1] device scratch.
template <class T, class TC>
void grouped_row_gemm(cuda_stream stream, const RowGemm<T, T, TC>& p, index_t S, const std::int32_t* offsets,
                      index_t E, std::int32_t* tile_offsets, GemmPath path) {
#if !defined(SMOE_CUDA_EMULATION)
  if constexpr (tensor_core_type_v<T>) {
    if (path == GemmPath::fastest && (p.b.col_stride == 1 || p.b.row_stride == 1) && S > 0 && p.N > 0) {
      for_each_index(stream, 1, TileOffsets{offsets, tile_offsets, E, tc::BM});
      const dim3 grid(static_cast<unsigned>((S + tc::BM - 1) / tc::BM + E), static_cast<unsigned>((p.N + tc::BN - 1) / tc::BN));
      if (p.b.col_stride == 1)
        tc::row_gemm_kernel<T, TC, false><<<grid, tc::threads, 0, stream>>>(p, offsets, tile_offsets, E);
      else
        tc::row_gemm_kernel<T, TC, true><<<grid, tc::threads, 0, stream>>>(p, offsets, tile_offsets, E);
      check(cudaGetLastError(), "row_gemm_kernel launch");
      return;
    }
  }
#endif
  (void)offsets, (void)E, (void)tile_offsets, (void)path;
  for_each_index(stream, S * p.N, p);
}

// GroupedOuterSum over E experts' slots: tensor cores for bf16/fp16 with an A operand on the GPU,
// else the portable functor.
template <class T>
void grouped_outer_sum(cuda_stream stream, const GroupedOuterSum<T, T, T>& p, index_t E, GemmPath path) {
#if !defined(SMOE_CUDA_EMULATION)
  if constexpr (tensor_core_type_v<T>) {
    if (path == GemmPath::fastest && p.a != nullptr && p.offsets != nullptr && E > 0 && p.I > 0 && p.J > 0) {
      const index_t tiles_i = (p.I + tc::BM - 1) / tc::BM, tiles_j = (p.J + tc::BN - 1) / tc::BN;
      const dim3 grid(static_cast<unsigned>(tiles_i * tiles_j), static_cast<unsigned>(E));
      tc::outer_sum_kernel<T><<<grid, tc::threads, 0, stream>>>(p, tiles_j);
      check(cudaGetLastError(), "outer_sum_kernel launch");
      return;
    }
  }
#endif
  (void)path;
  for_each_index(stream, E * p.I * p.J, p);
}

}  // namespace smoe::cuda_kernels
