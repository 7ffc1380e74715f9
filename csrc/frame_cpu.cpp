// The canonical frame's host ops (see frame_cpu.h and the NumPy twins in e3relax_fast/reference/).

#include "frame_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <vector>

namespace e3frame {
namespace {

// The reference's constants (reference/frame_bookkeeping.py): ranking resolution 1e-5 and the
// wrap margin of half of it.
constexpr int64_t kScale = 100000;
constexpr double kWrapEps = 0.5e-5;

// 3x3 row-major helpers; rounding is round-half-to-even (np.rint, np.round) via nearbyint in the
// default rounding mode.
struct M3 {
  double a[9];
  double operator()(int i, int j) const { return a[3 * i + j]; }
  double& operator()(int i, int j) { return a[3 * i + j]; }
};

M3 load(const double* p) {
  M3 r;
  std::copy(p, p + 9, r.a);
  return r;
}

template <class T>
M3 load_int(const T* p) {
  M3 r;
  for (int i = 0; i < 9; ++i) r.a[i] = static_cast<double>(p[i]);
  return r;
}

M3 mul(const M3& x, const M3& y) {
  M3 r;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) r(i, j) = x(i, 0) * y(0, j) + x(i, 1) * y(1, j) + x(i, 2) * y(2, j);
  return r;
}

M3 transpose(const M3& x) {
  M3 r;
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) r(i, j) = x(j, i);
  return r;
}

double det(const M3& x) {
  return x(0, 0) * (x(1, 1) * x(2, 2) - x(1, 2) * x(2, 1)) - x(0, 1) * (x(1, 0) * x(2, 2) - x(1, 2) * x(2, 0)) +
         x(0, 2) * (x(1, 0) * x(2, 1) - x(1, 1) * x(2, 0));
}

// Inverse by the adjugate (the cells here are well conditioned: validated before the frame).
M3 inverse(const M3& x) {
  M3 r;
  const double inv_det = 1.0 / det(x);
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      const int i1 = (j + 1) % 3, i2 = (j + 2) % 3, j1 = (i + 1) % 3, j2 = (i + 2) % 3;
      r(i, j) = (x(i1, j1) * x(i2, j2) - x(i1, j2) * x(i2, j1)) * inv_det;
    }
  }
  return r;
}

// Row vector times matrix: out = v @ x.
void row_times(const double* v, const M3& x, double* out) {
  for (int j = 0; j < 3; ++j) out[j] = v[0] * x(0, j) + v[1] * x(1, j) + v[2] * x(2, j);
}

int64_t key_of(int64_t z, const double* wrapped) {
  int64_t key = z;
  for (int c = 0; c < 3; ++c) {
    int64_t q = static_cast<int64_t>(std::nearbyint(wrapped[c] * static_cast<double>(kScale))) % kScale;
    if (q < 0) q += kScale;  // floor modulo, as NumPy's %: a coordinate that rounds to 1 is 0
    key = key * kScale + q;
  }
  return key;
}

std::string format_off(double worst) {
  char text[64];
  std::snprintf(text, sizeof text, "%.2g", worst);
  return text;
}

// The smallest-table description (reference: _choose_description): the chosen candidate's lattice
// isometry and per-atom shifts (canonical fractions P x + shift, wrapped).
void choose_description(const BookkeepingIn& in, const M3& basis, const M3& basis_inverse, M3& linear,
                        std::vector<double>& shifts) {
  const int64_t m = in.m;
  // Pinning of a polar origin: the atoms of the rarest species (ties: the heaviest), each in turn
  // put at zero along the polar directions; pin is the projection onto them as a map of fractions.
  std::vector<int64_t> pinned_atoms;
  M3 pin{};
  if (in.d > 0) {
    int64_t rarest = -1, fewest = std::numeric_limits<int64_t>::max();
    std::vector<int64_t> species(in.numbers, in.numbers + m);
    std::sort(species.begin(), species.end());
    for (size_t s = 0; s < species.size();) {
      size_t e = s;
      while (e < species.size() && species[e] == species[s]) ++e;
      if (static_cast<int64_t>(e - s) <= fewest) {
        fewest = static_cast<int64_t>(e - s);
        rarest = species[s];
      }
      s = e;
    }
    for (int64_t j = 0; j < m; ++j)
      if (in.numbers[j] == rarest) pinned_atoms.push_back(j);
    if (in.d >= 3) {
      pin = M3{{1, 0, 0, 0, 1, 0, 0, 0, 1}};
    } else {
      // Orthogonal projector onto the span of the d Cartesian rows r = polar @ basis (row action):
      // R^T (R R^T)^-1 R, with d = 1 or 2.
      double rows[2][3];
      for (int64_t a = 0; a < in.d; ++a) row_times(in.polar + 3 * a, basis, rows[a]);
      double gram[2][2], gram_inv[2][2];
      for (int64_t a = 0; a < in.d; ++a)
        for (int64_t b = 0; b < in.d; ++b)
          gram[a][b] = rows[a][0] * rows[b][0] + rows[a][1] * rows[b][1] + rows[a][2] * rows[b][2];
      if (in.d == 1) {
        gram_inv[0][0] = 1.0 / gram[0][0];
      } else {
        const double g = gram[0][0] * gram[1][1] - gram[0][1] * gram[1][0];
        gram_inv[0][0] = gram[1][1] / g;
        gram_inv[1][1] = gram[0][0] / g;
        gram_inv[0][1] = -gram[0][1] / g;
        gram_inv[1][0] = -gram[1][0] / g;
      }
      M3 projector{};
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
          for (int64_t a = 0; a < in.d; ++a)
            for (int64_t b = 0; b < in.d; ++b) projector(i, j) += rows[a][i] * gram_inv[a][b] * rows[b][j];
      pin = mul(mul(basis, projector), basis_inverse);
    }
  }
  const int64_t per_linear = in.d > 0 ? static_cast<int64_t>(pinned_atoms.size()) : 1;
  std::vector<double> moved(3 * m), wrapped(3 * m), best_wrapped;
  std::vector<int64_t> keys(m), best_keys;
  int64_t best_linear = -1;
  for (int64_t ci = 0; ci < in.c; ++ci) {
    const double* lin = in.norm_linear + 9 * ci;
    const double* s = in.norm_shift + 3 * ci;
    for (int64_t j = 0; j < m; ++j) {
      const double* x = in.x_std + 3 * j;
      for (int i = 0; i < 3; ++i) moved[3 * j + i] = (x[0] * lin[3 * i] + x[1] * lin[3 * i + 1] + x[2] * lin[3 * i + 2]) + s[i];
    }
    for (int64_t a = 0; a < per_linear; ++a) {
      double origin[3] = {0.0, 0.0, 0.0};
      if (in.d > 0) row_times(&moved[3 * pinned_atoms[a]], pin, origin);
      for (int64_t j = 0; j < m; ++j) {
        for (int i = 0; i < 3; ++i) {
          const double v = moved[3 * j + i] - origin[i];
          wrapped[3 * j + i] = v - std::floor(v + kWrapEps);
        }
        keys[j] = key_of(in.numbers[j], &wrapped[3 * j]);
      }
      std::sort(keys.begin(), keys.end());
      // The lexicographically smallest table wins; ties keep the first candidate.
      if (best_linear < 0 || std::lexicographical_compare(keys.begin(), keys.end(), best_keys.begin(), best_keys.end())) {
        best_linear = ci;
        best_keys = keys;
        best_wrapped = wrapped;
      }
    }
  }
  linear = load(in.norm_linear + 9 * best_linear);
  shifts.assign(3 * m, 0.0);
  for (int64_t j = 0; j < m; ++j) {
    const double* x = in.x_std + 3 * j;
    for (int i = 0; i < 3; ++i)
      shifts[3 * j + i] = best_wrapped[3 * j + i] - (x[0] * linear(i, 0) + x[1] * linear(i, 1) + x[2] * linear(i, 2));
  }
}

}  // namespace

std::string frame_bookkeeping(const BookkeepingIn& in, const BookkeepingOut& out) {
  const int64_t m = in.m, n = in.n, k = in.k;
  if (m < 1 || n < 1 || in.c < 1) return "the symmetry search returned an empty cell or normalizer";
  for (int64_t i = 0; i < n; ++i)
    if (in.mapping[i] < 0 || in.mapping[i] >= m) return "the symmetry search's atom mapping is out of range";
  const M3 basis = load(in.basis);
  const M3 basis_inverse = inverse(basis);
  M3 linear;
  std::vector<double> shifts;
  choose_description(in, basis, basis_inverse, linear, shifts);

  // Canonical fractions and the table order of the atoms (stable: ties keep moyopy's order).
  std::vector<double> frac(3 * m);
  std::vector<int64_t> keys(m), order(m), rank(m);
  for (int64_t j = 0; j < m; ++j) {
    const double* x = in.x_std + 3 * j;
    for (int i = 0; i < 3; ++i)
      frac[3 * j + i] = (x[0] * linear(i, 0) + x[1] * linear(i, 1) + x[2] * linear(i, 2)) + shifts[3 * j + i];
    keys[j] = key_of(in.numbers[j], &frac[3 * j]);
  }
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return keys[a] < keys[b]; });
  std::vector<double> frac_sorted(3 * m), x_sorted(3 * m);
  for (int64_t j = 0; j < m; ++j) {
    const int64_t o = order[j];
    rank[o] = j;
    out.numbers[j] = in.numbers[o];
    for (int i = 0; i < 3; ++i) {
      frac_sorted[3 * j + i] = frac[3 * o + i];
      x_sorted[3 * j + i] = in.x_std[3 * o + i];
      out.choice_images[3 * j + i] = static_cast<int64_t>(std::nearbyint(shifts[3 * o + i] - shifts[3 * order[0] + i]));
    }
    row_times(&frac_sorted[3 * j], basis, out.positions + 3 * j);
  }
  for (int i = 0; i < 9; ++i) out.linear[i] = static_cast<int64_t>(std::nearbyint(linear.a[i]));
  for (int i = 0; i < 3; ++i) out.shift[i] = shifts[3 * order[0] + i];
  for (int64_t i = 0; i < n; ++i) out.atom_map[i] = rank[in.mapping[i]];

  // Permutations (reference: _permutations): operation g moves atom j onto the nearest atom of its
  // species, which must be within 4 symprec, each atom hit once.
  double worst = 0.0;
  bool is_permutation = true;
  std::vector<char> hit(m);
  for (int64_t g = 0; g < k; ++g) {
    int64_t* row = out.permutations + g * m;
    if (!in.moving[g]) {
      std::iota(row, row + m, 0);
      continue;
    }
    const int64_t* r = in.rotations + 9 * g;
    const double* t = in.translations + 3 * g;
    std::fill(hit.begin(), hit.end(), 0);
    for (int64_t j = 0; j < m; ++j) {
      const double* x = &frac_sorted[3 * j];
      double moved[3];
      for (int i = 0; i < 3; ++i)
        moved[i] = (x[0] * static_cast<double>(r[3 * i]) + x[1] * static_cast<double>(r[3 * i + 1]) +
                    x[2] * static_cast<double>(r[3 * i + 2])) + t[i];
      double best = std::numeric_limits<double>::infinity();
      int64_t found = 0;
      for (int64_t q = 0; q < m; ++q) {
        if (out.numbers[q] != out.numbers[j]) continue;
        double diff[3], cart[3];
        for (int i = 0; i < 3; ++i) {
          diff[i] = moved[i] - frac_sorted[3 * q + i];
          diff[i] -= std::nearbyint(diff[i]);
        }
        row_times(diff, basis, cart);
        const double dist = std::sqrt(cart[0] * cart[0] + cart[1] * cart[1] + cart[2] * cart[2]);
        if (dist < best) {
          best = dist;
          found = q;
        }
      }
      row[j] = found;
      if (hit[found]) is_permutation = false;
      hit[found] = 1;
      if (!(best <= worst)) worst = best;  // NaN propagates, as NumPy's max
    }
  }
  if (!(worst <= 4 * in.symprec) || !is_permutation)
    return "the symmetry operations do not map the refined cell onto itself (off by " + format_off(worst) + " Å)";

  // The user's description (reference: _user_bookkeeping).
  const M3 rotation = load(in.rotation);
  const M3 t_float = mul(mul(load(in.lattice), transpose(rotation)), basis_inverse);
  double off_integer = 0.0;
  M3 t_int;
  for (int i = 0; i < 9; ++i) {
    t_int.a[i] = std::nearbyint(t_float.a[i]);
    off_integer = std::max(off_integer, std::fabs(t_float.a[i] - t_int.a[i]));
    out.user_cell[i] = static_cast<int64_t>(t_int.a[i]);
  }
  if (!(off_integer <= 1e-3) || std::nearbyint(std::fabs(det(t_int))) * static_cast<double>(m) != static_cast<double>(n))
    return "the input cell is not an integer combination of the primitive cell found";
  std::vector<double> rotated(3 * n), residual(3 * n);
  const M3 rotation_t = transpose(rotation);
  for (int64_t i = 0; i < n; ++i) row_times(in.positions + 3 * i, rotation_t, &rotated[3 * i]);
  double reference[3], start[3];
  row_times(&x_sorted[3 * out.atom_map[0]], basis, start);
  for (int i = 0; i < 3; ++i) reference[i] = rotated[i] - start[i];
  double mean[3] = {0.0, 0.0, 0.0};
  for (int64_t i = 0; i < n; ++i) {
    const double* x = &x_sorted[3 * out.atom_map[i]];
    double rel[3], f[3], placed[3], cart[3];
    for (int c = 0; c < 3; ++c) rel[c] = rotated[3 * i + c] - reference[c];
    row_times(rel, basis_inverse, f);
    for (int c = 0; c < 3; ++c) {
      const double image = std::nearbyint(f[c] - x[c]);
      out.images[3 * i + c] = static_cast<int64_t>(image);
      placed[c] = x[c] + image;
    }
    row_times(placed, basis, cart);
    for (int c = 0; c < 3; ++c) {
      residual[3 * i + c] = rotated[3 * i + c] - cart[c];
      mean[c] += residual[3 * i + c];
    }
  }
  for (int c = 0; c < 3; ++c) out.offset[c] = mean[c] / static_cast<double>(n);
  double spread = 0.0;
  for (int64_t i = 0; i < n; ++i)
    for (int c = 0; c < 3; ++c) spread = std::max(spread, std::fabs(residual[3 * i + c] - out.offset[c]));
  if (!(spread <= 4 * in.symprec)) return "the input atoms do not map onto the refined primitive cell within symprec";
  return "";
}

std::string frame_map_back(const MapBackIn& in, double* out_positions, double* out_cell) {
  const int64_t m = in.m, n = in.n, k = in.k;
  for (int64_t i = 0; i < n; ++i)
    if (in.atom_map[i] < 0 || in.atom_map[i] >= m) return "frame_map_back: atom_map is out of range";
  const M3 frame_cell = load(in.frame_cell);
  const M3 frame_inverse = inverse(frame_cell);
  M3 cell = load(in.cell);
  std::vector<double> pos(in.positions, in.positions + 3 * m);

  if (in.symmetrize && k > 0) {
    // reference: symmetrize_prediction. cell = frame_cell @ F; u the displacement on top of F,
    // from each atom's own image; F and u averaged over the operations Q = B^-1 R^T B.
    const M3 deformation = mul(frame_inverse, cell);
    const M3 cell_inverse = inverse(cell);
    std::vector<double> u(3 * m);
    for (int64_t j = 0; j < m; ++j) {
      double base[3], f[3];
      row_times(in.frame_positions + 3 * j, deformation, base);
      for (int c = 0; c < 3; ++c) u[3 * j + c] = pos[3 * j + c] - base[c];
      row_times(&u[3 * j], cell_inverse, f);
      for (int c = 0; c < 3; ++c) f[c] -= std::nearbyint(f[c]);
      row_times(f, cell, &u[3 * j]);
    }
    M3 f_sum{};
    std::vector<double> u_sum(3 * m, 0.0);
    for (int64_t g = 0; g < k; ++g) {
      const M3 q = mul(mul(frame_inverse, transpose(load_int(in.rotations + 9 * g))), frame_cell);
      const M3 f_g = mul(mul(transpose(q), deformation), q);
      for (int i = 0; i < 9; ++i) f_sum.a[i] += f_g.a[i];
      const int64_t* perm = in.permutations + g * m;
      for (int64_t j = 0; j < m; ++j) {
        if (perm[j] < 0 || perm[j] >= m) return "frame_map_back: permutations are out of range";
        double moved[3];
        row_times(&u[3 * j], q, moved);
        for (int c = 0; c < 3; ++c) u_sum[3 * perm[j] + c] += moved[c];
      }
    }
    const double inv_k = 1.0 / static_cast<double>(k);
    M3 f_sym;
    for (int i = 0; i < 9; ++i) f_sym.a[i] = f_sum.a[i] * inv_k;
    for (int64_t j = 0; j < m; ++j) {
      double base[3];
      row_times(in.frame_positions + 3 * j, f_sym, base);
      for (int c = 0; c < 3; ++c) pos[3 * j + c] = base[c] + u_sum[3 * j + c] * inv_k;
    }
    cell = mul(frame_cell, f_sym);
  }

  // reference: align_fractional_centroid. The centroid keeps the input's fractional coordinates.
  double input_mean[3] = {0, 0, 0}, mean[3] = {0, 0, 0}, f[3], target[3];
  for (int64_t j = 0; j < m; ++j)
    for (int c = 0; c < 3; ++c) {
      input_mean[c] += in.frame_positions[3 * j + c];
      mean[c] += pos[3 * j + c];
    }
  for (int c = 0; c < 3; ++c) {
    input_mean[c] /= static_cast<double>(m);
    mean[c] /= static_cast<double>(m);
  }
  row_times(input_mean, frame_inverse, f);
  row_times(f, cell, target);
  for (int64_t j = 0; j < m; ++j)
    for (int c = 0; c < 3; ++c) pos[3 * j + c] += target[c] - mean[c];

  // reference: to_user. Canonical fractions back through the lattice isometry P (exact integer
  // inverse), the cell through P^T cell Q^T with Q = B^-1 P^T B, then the user's supercell, images
  // and orientation.
  const M3 linear = load_int(in.choice_linear);
  M3 linear_inverse = inverse(linear);
  for (double& v : linear_inverse.a) v = std::nearbyint(v);
  const M3 std_rotation = mul(mul(frame_inverse, transpose(linear)), frame_cell);
  const M3 std_cell = mul(mul(transpose(linear), cell), transpose(std_rotation));
  const M3 cell_inverse = inverse(cell);
  const M3 linear_inverse_t = transpose(linear_inverse);
  const M3 rotation = load(in.rotation);
  std::vector<double> frac(3 * m);
  for (int64_t j = 0; j < m; ++j) {
    double x[3];
    row_times(&pos[3 * j], cell_inverse, x);
    for (int c = 0; c < 3; ++c) x[c] -= in.choice_shift[c] + static_cast<double>(in.choice_images[3 * j + c]);
    row_times(x, linear_inverse_t, &frac[3 * j]);
  }
  double offset[3];
  row_times(in.offset, frame_inverse, offset);
  const M3 to_user_cell = mul(std_cell, rotation);
  for (int64_t i = 0; i < n; ++i) {
    double x[3];
    const int64_t a = in.atom_map[i];
    for (int c = 0; c < 3; ++c) x[c] = frac[3 * a + c] + static_cast<double>(in.images[3 * i + c]) + offset[c];
    row_times(x, to_user_cell, out_positions + 3 * i);
  }
  const M3 user = mul(load_int(in.user_cell), to_user_cell);
  std::copy(user.a, user.a + 9, out_cell);
  return "";
}

bool frame_p1_certificate(const int64_t* numbers, const double* x, int64_t n, const double* basis, double tolerance) {
  if (n < 1) return false;
  // The rarest species (ties: smallest Z) and its first atom: every operation maps that atom onto an
  // atom of its species, so the candidates below are all there is to rule out.
  int64_t rare_z = 0, rare_count = n + 1;
  for (int64_t i = 0; i < n; ++i) {
    int64_t count = 0;
    for (int64_t j = 0; j < n; ++j) count += numbers[j] == numbers[i];
    if (count < rare_count || (count == rare_count && numbers[i] < rare_z)) rare_z = numbers[i], rare_count = count;
  }
  int64_t first = 0;
  while (numbers[first] != rare_z) ++first;
  const double tol2 = tolerance * tolerance;
  // Whether x -> sign * x + t maps every atom within tolerance of a same-species atom.
  auto maps_onto_itself = [&](double sign, const double* t) {
    for (int64_t i = 0; i < n; ++i) {
      bool found = false;
      for (int64_t j = 0; j < n && !found; ++j) {
        if (numbers[j] != numbers[i]) continue;
        double f[3], r[3] = {0.0, 0.0, 0.0};
        for (int a = 0; a < 3; ++a) {
          f[a] = sign * x[3 * i + a] + t[a] - x[3 * j + a];
          f[a] -= std::nearbyint(f[a]);  // round half to even, as NumPy's round
        }
        for (int a = 0; a < 3; ++a)
          for (int b = 0; b < 3; ++b) r[b] += f[a] * basis[3 * a + b];
        found = r[0] * r[0] + r[1] * r[1] + r[2] * r[2] <= tol2;
      }
      if (!found) return false;
    }
    return true;
  };
  // The reference's order: translations x_j - x_0 (j after the first), then inversions x_j + x_0.
  for (double sign : {1.0, -1.0}) {
    for (int64_t j = 0; j < n; ++j) {
      if (numbers[j] != rare_z || (sign > 0 && j == first)) continue;
      double t[3];
      for (int a = 0; a < 3; ++a) t[a] = x[3 * j + a] - sign * x[3 * first + a];
      if (maps_onto_itself(sign, t)) return false;
    }
  }
  return true;
}

}  // namespace e3frame

