#!/usr/bin/env python3
"""png_regions.py — checks a screenshot of the report: every chart's region is drawn.

    /usr/bin/python3 tests/ref/png_regions.py SHOT.png N_CHARTS HEADER_H FIG_H CHART_W CHART_H

Decodes the PNG with zlib and NumPy only (8-bit RGB or RGBA, no interlace), then for
chart k, the region x < CHART_W, HEADER_H + k*FIG_H <= y < ... + CHART_H must hold
(a) more than 3% of pixels that are not white, (b) more than 150 saturated pixels in
the plot area, legend left out (lines, markers, heat-map cells: max - min channel > 60;
axes and text are grey or black), (c) at least 8 distinct colours. The band after the charts (the tables) must
hold text. Exits 1 naming the first region that fails.
"""
import struct
import sys
import zlib

import numpy as np


def decode_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        n, = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
        elif kind == b"IDAT":
            idat.append(body)
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = w * bpp
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        if f == 0:
            cur = line
        elif f == 2:
            cur = (line + prev) & 255
        elif f == 1:
            cur = line.copy()
            for c in range(bpp):  # recon[x] = filt[x] + recon[x - bpp]: a running sum
                cur[c::bpp] = np.cumsum(line[c::bpp]) & 255
        else:
            cur = bytearray(stride)
            L, P = line.tolist(), prev.tolist()
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                b = P[x]
                if f == 3:
                    cur[x] = (L[x] + ((a + b) >> 1)) & 255
                else:
                    c = P[x - bpp] if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pr = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                    cur[x] = (L[x] + pr) & 255
            cur = np.frombuffer(bytes(cur), np.uint8).astype(np.int32)
        out[y] = cur
        prev = cur
    return out.reshape(h, w, bpp)[:, :, :3]


def main():
    path = sys.argv[1]
    n, header_h, fig_h, chart_w, chart_h = map(int, sys.argv[2:7])
    img = decode_png(path).astype(np.int32)
    h, w, _ = img.shape
    bad = 0
    for k in range(n):
        y0 = header_h + k * fig_h
        if y0 + chart_h > h:
            print(f"chart {k}: outside the screenshot ({h} px high)")
            return 1
        r = img[y0:y0 + chart_h, :min(chart_w, w)]
        plot = r[:, 72:chart_w - 190]  # the plot area, without the legend
        nonwhite = (r.min(2) < 245).mean()
        sat = int(((plot.max(2) - plot.min(2)) > 60).sum())
        colours = len(np.unique(r.reshape(-1, 3) // 8, axis=0))
        ok = nonwhite > 0.03 and sat > 150 and colours >= 8
        print(f"chart {k}: y {y0}..{y0 + chart_h}: non-white {nonwhite:.3f}, saturated {sat}, "
              f"colours {colours}: {'ok' if ok else 'BLANK'}")
        bad += not ok
    t0 = header_h + n * fig_h
    tail = img[t0:t0 + 200]
    text = tail.size and (tail.min(2) < 128).mean()
    print(f"tables: y {t0}..{t0 + 200}: dark {text:.4f}")
    if not text or text < 0.002:
        print("the summary table is missing")
        bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
