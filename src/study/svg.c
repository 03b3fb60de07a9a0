/*
 * svg.c — hand-written SVG charts for the report: line charts (axes with round ticks,
 * grid, axis titles, legend; NaN breaks a line; a single point is drawn as a marker;
 * optional log scale) and heat maps with a colour scale. Every text is XML-escaped;
 * numbers are written in the C locale's fixed format, so the output is byte-identical
 * across runs.
 */
#include "study_internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static const char *const palette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                      "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};

const char *dsmoe__palette(int32_t i) {
    int32_t n = (int32_t)(sizeof palette / sizeof palette[0]);
    return palette[((i % n) + n) % n];
}

#define ML 72 /* margins: left, right (legend), top, bottom */
#define MR 190
#define MT 36
#define MB 48

static void svg_open(dsmoe__buf *b, const dsmoe__chart *c) {
    dsmoe__buf_printf(b,
                      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
                      "viewBox=\"0 0 %d %d\" font-family=\"sans-serif\" font-size=\"12\">\n"
                      "<rect x=\"0\" y=\"0\" width=\"%d\" height=\"%d\" fill=\"#ffffff\"/>\n",
                      c->width, c->height, c->width, c->height, c->width, c->height);
    dsmoe__buf_printf(b, "<text x=\"%d\" y=\"22\" font-size=\"15\" font-weight=\"bold\">", ML);
    dsmoe__buf_xml(b, c->title);
    dsmoe__buf_printf(b, "</text>\n");
}

/* Round tick step for a range: 1, 2 or 5 times a power of ten, about n ticks. */
static double tick_step(double range, int n) {
    double raw = range / n, p = pow(10, floor(log10(raw))), f = raw / p;
    return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

static void fmt_tick(char *buf, size_t cap, double v, double step) {
    if (fabs(v) < step * 1e-9) v = 0;
    if (fabs(v) >= 1e5 || (v != 0 && fabs(v) < 1e-3)) snprintf(buf, cap, "%.2g", v);
    else if (step >= 1) snprintf(buf, cap, "%.0f", v);
    else snprintf(buf, cap, "%.*f", (int)ceil(-log10(step) - 1e-9), v);
}

/* Expands a degenerate range. */
static void pad_range(double *lo, double *hi) {
    if (*hi > *lo) return;
    double d = fabs(*lo) > 0 ? fabs(*lo) * 0.1 : 0.5;
    *lo -= d;
    *hi += d;
}

void dsmoe__svg_lines(dsmoe__buf *b, const dsmoe__chart *c, const dsmoe__series *s, int32_t ns) {
    svg_open(b, c);
    const int W = c->width - ML - MR, H = c->height - MT - MB;
    double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
    int log_y = c->log_y;
    for (int32_t k = 0; k < ns; k++)
        for (int64_t i = 0; i < s[k].n; i++) {
            double x = s[k].x[i], y = s[k].y[i];
            if (!isfinite(x) || !isfinite(y) || (log_y && !(y > 0))) continue;
            if (log_y) y = log10(y);
            x0 = fmin(x0, x);
            x1 = fmax(x1, x);
            y0 = fmin(y0, y);
            y1 = fmax(y1, y);
        }
    dsmoe__buf_printf(b, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"#fafafa\" stroke=\"#333333\"/>\n",
                      ML, MT, W, H);
    if (!(x0 <= x1)) {
        dsmoe__buf_printf(b, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" fill=\"#666666\">no data</text>\n</svg>\n",
                          ML + W / 2, MT + H / 2);
        return;
    }
    pad_range(&x0, &x1);
    pad_range(&y0, &y1);
    double ypad = (y1 - y0) * 0.05;
    y0 -= ypad;
    y1 += ypad;
#define PX(x) (ML + ((x) - x0) / (x1 - x0) * W)
#define PY(y) (MT + H - ((y) - y0) / (y1 - y0) * H)
    /* grid and ticks */
    char t[48];
    double xs = tick_step(x1 - x0, 6);
    for (int64_t k = (int64_t)ceil(x0 / xs); (double)k * xs <= x1 + xs * 1e-9; k++) {
        double v = (double)k * xs, px = PX(v);
        fmt_tick(t, sizeof t, v, xs);
        dsmoe__buf_printf(b, "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#dddddd\"/>"
                             "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n",
                          px, MT, px, MT + H, px, MT + H + 16, t);
    }
    if (log_y) {
        for (int e = (int)floor(y0); e <= (int)ceil(y1); e++)
            for (int m = 1; m <= 9; m++) {
                double v = e + log10((double)m);
                if (v < y0 || v > y1) continue;
                double py = PY(v);
                dsmoe__buf_printf(b, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"%s\"/>\n", ML, py,
                                  ML + W, py, m == 1 ? "#cccccc" : "#eeeeee");
                if (m == 1 || ((m == 2 || m == 5) && y1 - y0 < 2.5)) {
                    snprintf(t, sizeof t, "%g", pow(10, v));
                    dsmoe__buf_printf(b, "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n", ML - 6, py + 4, t);
                }
            }
    } else {
        double ys = tick_step(y1 - y0, 5);
        for (int64_t k = (int64_t)ceil(y0 / ys); (double)k * ys <= y1 + ys * 1e-9; k++) {
            double v = (double)k * ys, py = PY(v);
            fmt_tick(t, sizeof t, v, ys);
            dsmoe__buf_printf(b, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#dddddd\"/>"
                                 "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n",
                              ML, py, ML + W, py, ML - 6, py + 4, t);
        }
    }
    dsmoe__buf_printf(b, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">", ML + W / 2, c->height - 10);
    dsmoe__buf_xml(b, c->xlabel);
    dsmoe__buf_printf(b, "</text>\n<text x=\"16\" y=\"%d\" text-anchor=\"middle\" transform=\"rotate(-90 16 %d)\">",
                      MT + H / 2, MT + H / 2);
    dsmoe__buf_xml(b, c->ylabel);
    dsmoe__buf_printf(b, "</text>\n");
    /* series: at most DSMOE__MAX_POINTS points each (every stride-th, and the last) */
    for (int32_t k = 0; k < ns; k++) {
        const char *col = dsmoe__palette(s[k].color);
        int open = 0;
        int64_t npts = 0, stride = (s[k].n + DSMOE__MAX_POINTS - 1) / DSMOE__MAX_POINTS;
        if (stride < 1) stride = 1;
        /* i steps by stride; the step that would pass the end lands on the last point */
        for (int64_t i = 0; i < s[k].n; i += (i + stride < s[k].n || i == s[k].n - 1) ? stride : s[k].n - 1 - i) {
            double x = s[k].x[i], y = s[k].y[i];
            int ok = isfinite(x) && isfinite(y) && !(log_y && !(y > 0));
            if (!ok) {
                if (open) dsmoe__buf_printf(b, "\"/>\n");
                open = 0;
                continue;
            }
            if (log_y) y = log10(y);
            npts++;
            if (!open) {
                dsmoe__buf_printf(b, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.6\"%s points=\"", col,
                                  s[k].dashed ? " stroke-dasharray=\"5,3\"" : "");
                open = 1;
            }
            dsmoe__buf_printf(b, "%.1f,%.1f ", PX(x), PY(y));
        }
        if (open) dsmoe__buf_printf(b, "\"/>\n");
        if (s[k].markers || npts <= 2)
            for (int64_t i = 0; i < s[k].n; i++) {
                double x = s[k].x[i], y = s[k].y[i];
                if (!isfinite(x) || !isfinite(y) || (log_y && !(y > 0))) continue;
                if (log_y) y = log10(y);
                dsmoe__buf_printf(b, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%s\"/>\n", PX(x), PY(y), col);
            }
    }
#undef PX
#undef PY
    /* legend */
    int row = 0;
    for (int32_t k = 0; k < ns && row < 24; k++) {
        if (!s[k].label) continue;
        int y = MT + 10 + row * 18;
        dsmoe__buf_printf(b, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\" stroke-width=\"3\"%s/>"
                             "<text x=\"%d\" y=\"%d\">",
                          ML + W + 12, y, ML + W + 36, y, dsmoe__palette(s[k].color),
                          s[k].dashed ? " stroke-dasharray=\"5,3\"" : "", ML + W + 42, y + 4);
        char lab[40]; /* long names are cut (at a UTF-8 boundary) to fit */
        size_t L = strlen(s[k].label);
        if (L >= sizeof lab) {
            L = sizeof lab - 4;
            while (L > 0 && ((unsigned char)s[k].label[L] & 0xC0) == 0x80) L--;
            snprintf(lab, sizeof lab, "%.*s...", (int)L, s[k].label);
        } else {
            memcpy(lab, s[k].label, L + 1);
        }
        dsmoe__buf_xml(b, lab);
        dsmoe__buf_printf(b, "</text>\n");
        row++;
    }
    dsmoe__buf_printf(b, "</svg>\n");
}

/* White to dark blue through light blue. */
static void heat_color(double f, char *out, size_t cap) {
    if (!(f >= 0)) f = 0;
    if (f > 1) f = 1;
    static const double stops[3][3] = {{255, 255, 255}, {107, 174, 214}, {8, 48, 107}};
    double t = f * 2;
    int i = t >= 1 ? 1 : 0;
    t -= i;
    int r = (int)lround(stops[i][0] + (stops[i + 1][0] - stops[i][0]) * t);
    int g = (int)lround(stops[i][1] + (stops[i + 1][1] - stops[i][1]) * t);
    int bl = (int)lround(stops[i][2] + (stops[i + 1][2] - stops[i][2]) * t);
    snprintf(out, cap, "#%02x%02x%02x", r, g, bl);
}

void dsmoe__svg_heat(dsmoe__buf *b, const dsmoe__chart *c, const double *v, int32_t rows,
                     int32_t cols, const char *const *row_labels, const char *const *col_labels,
                     double vmax, const char *scale_label) {
    svg_open(b, c);
    const int ml = row_labels ? 110 : ML, mr = 110;
    const int W = c->width - ml - mr, H = c->height - MT - MB;
    dsmoe__buf_printf(b, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"#eeeeee\" stroke=\"#333333\"/>\n",
                      ml, MT, W, H);
    if (rows < 1 || cols < 1 || !(vmax > 0)) {
        dsmoe__buf_printf(b, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" fill=\"#666666\">no data</text>\n</svg>\n",
                          ml + W / 2, MT + H / 2);
        return;
    }
    double cw = (double)W / cols, rh = (double)H / rows;
    char col[16];
    for (int32_t r = 0; r < rows; r++)
        for (int32_t k = 0; k < cols; k++) {
            double x = v[(int64_t)r * cols + k];
            if (!isfinite(x)) continue;
            heat_color(x / vmax, col, sizeof col);
            dsmoe__buf_printf(b, "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"%s\"/>\n",
                              ml + k * cw, MT + r * rh, cw + 0.3, rh + 0.3, col);
        }
    /* row labels: every row when they fit, else every n-th */
    int every = rows * 12 > H ? (rows * 12 + H - 1) / H : 1;
    for (int32_t r = 0; r < rows; r += every) {
        dsmoe__buf_printf(b, "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">", ml - 6, MT + (r + 0.5) * rh + 4);
        if (row_labels) {
            dsmoe__buf_xml(b, row_labels[r]);
        } else {
            dsmoe__buf_printf(b, "%d", r);
        }
        dsmoe__buf_printf(b, "</text>\n");
    }
    if (col_labels) {
        int ce = cols * 28 > W ? (cols * 28 + W - 1) / W : 1;
        for (int32_t k = 0; k < cols; k += ce) {
            dsmoe__buf_printf(b, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">", ml + (k + 0.5) * cw, MT + H + 16);
            dsmoe__buf_xml(b, col_labels[k]);
            dsmoe__buf_printf(b, "</text>\n");
        }
    }
    dsmoe__buf_printf(b, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">", ml + W / 2, c->height - 10);
    dsmoe__buf_xml(b, c->xlabel);
    dsmoe__buf_printf(b, "</text>\n<text x=\"14\" y=\"%d\" text-anchor=\"middle\" transform=\"rotate(-90 14 %d)\">",
                      MT + H / 2, MT + H / 2);
    dsmoe__buf_xml(b, c->ylabel);
    dsmoe__buf_printf(b, "</text>\n");
    /* colour scale */
    int sx = ml + W + 20, sw = 16;
    for (int i = 0; i < 20; i++) {
        heat_color(1.0 - (i + 0.5) / 20, col, sizeof col);
        dsmoe__buf_printf(b, "<rect x=\"%d\" y=\"%.1f\" width=\"%d\" height=\"%.1f\" fill=\"%s\"/>\n", sx,
                          MT + i * H / 20.0, sw, H / 20.0 + 0.3, col);
    }
    dsmoe__buf_printf(b, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#333333\"/>\n", sx,
                      MT, sw, H);
    dsmoe__buf_printf(b, "<text x=\"%d\" y=\"%d\">%.3g</text><text x=\"%d\" y=\"%d\">0</text>\n", sx + sw + 4, MT + 10,
                      vmax, sx + sw + 4, MT + H);
    dsmoe__buf_printf(b, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" transform=\"rotate(90 %d %d)\">",
                      sx + sw + 30, MT + H / 2, sx + sw + 30, MT + H / 2);
    dsmoe__buf_xml(b, scale_label);
    dsmoe__buf_printf(b, "</text>\n</svg>\n");
}
