// The canonical frame's three host ops in C++ (backend "cpu" of frame_bookkeeping, frame_map_back and
// frame_p1_certificate).
//
// Twins of e3relax_fast/reference/frame_bookkeeping.py, frame_map_back.py and frame_p1_certificate.py, same
// arguments and results (integers equal, floats to rounding): one crystal per call, a few hundred flops. The
// NumPy twins spend their time in the per-call cost of some sixty small array operations, not in
// arithmetic; here the whole crystal is a few loops. Units: Å; cells are 3x3 row-major with the
// lattice vectors as rows; fractional coordinates are rows x with Cartesian r = x @ cell.
#pragma once

#include <cstdint>
#include <string>

namespace e3frame {

// What moyopy found for one crystal and the user's description of it (shapes in the comments;
// m canonical atoms, c normalizer elements, d polar directions, k operations, n user atoms).
struct BookkeepingIn {
  const double* basis;        // (3, 3) primitive standard cell
  const int64_t* numbers;     // (m,)
  const double* x_std;        // (m, 3) standard fractions
  int64_t m;
  const double* norm_linear;  // (c, 3, 3) integer-valued
  const double* norm_shift;   // (c, 3)
  int64_t c;
  const double* polar;        // (d, 3) fractional directions
  int64_t d;
  const int64_t* rotations;   // (k, 3, 3), column action x' = R x + t
  const double* translations; // (k, 3)
  const bool* moving;         // (k,) false for the identity
  int64_t k;
  const int64_t* mapping;     // (n,) standard atom of each user atom
  int64_t n;
  const double* rotation;     // (3, 3) standard orientation, r_std = r_user @ rotation^T
  const double* lattice;      // (3, 3) user's cell
  const double* positions;    // (n, 3) user's atoms
  double symprec;
};

// Caller-allocated outputs.
struct BookkeepingOut {
  int64_t* numbers;        // (m,) in table order
  double* positions;       // (m, 3) canonical Cartesian positions
  int64_t* linear;         // (3, 3) chosen lattice isometry
  double* shift;           // (3,)
  int64_t* choice_images;  // (m, 3)
  int64_t* permutations;   // (k, m)
  int64_t* user_cell;      // (3, 3)
  int64_t* atom_map;       // (n,)
  int64_t* images;         // (n, 3)
  double* offset;          // (3,)
};

// Returns "" on success, else the reason the frame cannot be built (the reference's FrameError).
std::string frame_bookkeeping(const BookkeepingIn& in, const BookkeepingOut& out);

// A prediction for the canonical cell and the frame's arrays (CanonicalFrame's fields).
struct MapBackIn {
  const double* positions;        // (m, 3) prediction
  const double* cell;             // (3, 3) prediction
  const double* frame_positions;  // (m, 3) canonical input
  const double* frame_cell;       // (3, 3)
  int64_t m;
  const int64_t* rotations;       // (k, 3, 3) on canonical fractions
  const int64_t* permutations;    // (k, m)
  int64_t k;
  const int64_t* choice_linear;   // (3, 3)
  const double* choice_shift;     // (3,)
  const int64_t* choice_images;   // (m, 3)
  const int64_t* atom_map;        // (n,)
  const int64_t* images;          // (n, 3)
  int64_t n;
  const double* offset;           // (3,)
  const int64_t* user_cell;       // (3, 3)
  const double* rotation;         // (3, 3)
  bool symmetrize;
};

// Writes (n, 3) user positions and the (3, 3) user cell. Returns "" or why the inputs are invalid.
std::string frame_map_back(const MapBackIn& in, double* out_positions, double* out_cell);

// True when no pure translation but the lattice's and no inversion maps the crystal (n atoms,
// numbers (n,), fractions x (n, 3) in the reduced basis (3, 3)) onto itself with every atom within
// tolerance (Å) of a same-species atom (the reference's frame_p1_certificate).
bool frame_p1_certificate(const int64_t* numbers, const double* x, int64_t n, const double* basis, double tolerance);

}  // namespace e3frame
