"""Pure-Python port of include/smoe/core/rng.hpp (Philox4x32-10, Salmon et al. 2011).

    philox4x32(seed, counter, stream=0) -> (r0, r1, r2, r3)   four uint32 words
    uniform01(seed, counter, stream=0)  = r0 / 2^32                       in [0, 1)
    standard_normal(seed, counter, stream=0)                              Box-Muller on (r0, r1):
        u1 = (r0 + 1) / (2^32 + 1),  u2 = r1 / 2^32,  sqrt(-2 log u1) · cos(2π u2)

seed, counter and stream are uint64 (negative Python ints are taken modulo 2^64, as the C++
uint64 conversion of an int64 does). The numbers are the C++ ones bit for bit (the float ops are
the same IEEE double operations), so the oracles reproduce the library's noise and dropout masks.
"""
import math

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF


def philox4x32(seed, counter, stream=0):
    seed, counter, stream = seed & M64, counter & M64, stream & M64
    c0, c1 = counter & M32, counter >> 32
    c2, c3 = stream & M32, stream >> 32
    k0, k1 = seed & M32, seed >> 32
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        n0 = (p1 >> 32) ^ c1 ^ k0
        n2 = (p0 >> 32) ^ c3 ^ k1
        c1 = p1 & M32
        c3 = p0 & M32
        c0 = n0
        c2 = n2
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def uniform01(seed, counter, stream=0):
    return philox4x32(seed, counter, stream)[0] * (1.0 / 4294967296.0)


def standard_normal(seed, counter, stream=0):
    r = philox4x32(seed, counter, stream)
    u1 = (r[0] + 1.0) * (1.0 / 4294967297.0)
    u2 = r[1] * (1.0 / 4294967296.0)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(6.283185307179586 * u2)


# Values printed by a C++ program calling smoe::philox4x32 / uniform01 / standard_normal:
# ((seed, counter, stream), words, uniform01, standard_normal).
_CPP_VALUES = (
    ((0, 0, 0), (1713891541, 3781805453, 3159862348, 2600524760), 0.39904647064395249, 0.99113767922225771),
    ((1, 2, 3), (4031113034, 1366700262, 495645701, 3051723414), 0.93856664234772325, -0.14798347915026039),
    ((244837814094590, 123456789012345, 7), (1605467032, 975253990, 1309423272, 151699129), 0.37380192242562771,
     0.20142713231880305),
    ((42, 18446744073709551615, 18446744069414584321), (4176094301, 1274413867, 3206733555, 3952088456),
     0.97232272406108677, -0.068559520687604208),
    ((7, 5, 0), (1454331580, 1444137393, 3838310659, 3089486716), 0.33861295785754919, -0.75897989858268566),
)


def self_check():
    for args, words, u, z in _CPP_VALUES:
        assert philox4x32(*args) == words, (args, philox4x32(*args), words)
        assert uniform01(*args) == u, (args, uniform01(*args), u)
        assert abs(standard_normal(*args) - z) <= 1e-15, (args, standard_normal(*args), z)
    assert philox4x32(3, -1) == philox4x32(3, M64)  # int64 -1 hashes as its bit pattern


if __name__ == "__main__":
    self_check()
    print("philox.py: matches the C++ values")
