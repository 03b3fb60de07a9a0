/*
 * jtree.c — a JSON tree for one metrics.jsonl line (RFC 8259, strict: no comments,
 * trailing commas, NaN or leading zeros; strings decoded to valid UTF-8 without NUL),
 * and the text buffer the summary and report files are written from.
 */
#include "study_internal.h"

#include "io/io_internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct jparser {
    dsmoe__jtree *t;
    const char *s;
    size_t n, pos;
    const char *what;
    int depth;
} jparser;

static dsmoe_status jfail(const jparser *p, const char *problem) {
    return DSMOE__FAIL(DSMOE_STATUS_FORMAT, "%s: %s at column %zu", p->what, problem, p->pos + 1);
}

static void jws(jparser *p) {
    while (p->pos < p->n && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' || p->s[p->pos] == '\r' ||
                             p->s[p->pos] == '\n'))
        p->pos++;
}

static dsmoe_status jnode(jparser *p, dsmoe__jv_kind kind, int32_t *out) {
    dsmoe__jtree *t = p->t;
    if (t->n == t->cap) {
        int32_t nc = t->cap ? t->cap * 2 : 256;
        dsmoe__jv *nn = realloc(t->nodes, (size_t)nc * sizeof *nn);
        if (!nn) return DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "%s: out of memory", p->what);
        t->nodes = nn;
        t->cap = nc;
    }
    dsmoe__jv *v = &t->nodes[t->n];
    memset(v, 0, sizeof *v);
    v->kind = kind;
    v->first = v->next = -1;
    *out = t->n++;
    return DSMOE_OK;
}

static void put_utf8(char *d, size_t *k, uint32_t c) {
    if (c < 0x80) {
        d[(*k)++] = (char)c;
    } else if (c < 0x800) {
        d[(*k)++] = (char)(0xC0 | (c >> 6));
        d[(*k)++] = (char)(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
        d[(*k)++] = (char)(0xE0 | (c >> 12));
        d[(*k)++] = (char)(0x80 | ((c >> 6) & 0x3F));
        d[(*k)++] = (char)(0x80 | (c & 0x3F));
    } else {
        d[(*k)++] = (char)(0xF0 | (c >> 18));
        d[(*k)++] = (char)(0x80 | ((c >> 12) & 0x3F));
        d[(*k)++] = (char)(0x80 | ((c >> 6) & 0x3F));
        d[(*k)++] = (char)(0x80 | (c & 0x3F));
    }
}

static int hex4(const char *s, uint32_t *v) {
    uint32_t r = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        r <<= 4;
        if (c >= '0' && c <= '9') r |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') r |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') r |= (uint32_t)(c - 'A' + 10);
        else return 0;
    }
    *v = r;
    return 1;
}

/* Decodes the string at p->pos (the opening quote) into the tree's text. The text
 * buffer holds at least as many bytes as the line, and a decoded string is never
 * longer than its quoted form, so no check of room is needed. */
static dsmoe_status jstring(jparser *p, const char **out) {
    dsmoe__jtree *t = p->t;
    char *d = t->text + t->text_used;
    size_t k = 0;
    p->pos++; /* " */
    for (;;) {
        if (p->pos >= p->n) return jfail(p, "unterminated string");
        unsigned char c = (unsigned char)p->s[p->pos];
        if (c == '"') {
            p->pos++;
            break;
        }
        if (c < 0x20) return jfail(p, "control character in a string");
        if (c != '\\') {
            size_t L = dsmoe__utf8_seq((const unsigned char *)p->s + p->pos, p->n - p->pos);
            if (L == 0) return jfail(p, "invalid UTF-8 in a string");
            memcpy(d + k, p->s + p->pos, L);
            k += L;
            p->pos += L;
            continue;
        }
        if (p->pos + 1 >= p->n) return jfail(p, "unterminated string");
        char e = p->s[p->pos + 1];
        p->pos += 2;
        switch (e) {
        case '"': d[k++] = '"'; break;
        case '\\': d[k++] = '\\'; break;
        case '/': d[k++] = '/'; break;
        case 'b': d[k++] = '\b'; break;
        case 'f': d[k++] = '\f'; break;
        case 'n': d[k++] = '\n'; break;
        case 'r': d[k++] = '\r'; break;
        case 't': d[k++] = '\t'; break;
        case 'u': {
            uint32_t u;
            if (p->pos + 4 > p->n || !hex4(p->s + p->pos, &u)) return jfail(p, "bad \\u escape");
            p->pos += 4;
            if (u >= 0xD800 && u < 0xDC00) {
                uint32_t lo;
                if (p->pos + 6 > p->n || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u' ||
                    !hex4(p->s + p->pos + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                    return jfail(p, "unpaired surrogate in a \\u escape");
                p->pos += 6;
                u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
            } else if (u >= 0xDC00 && u < 0xE000) {
                return jfail(p, "unpaired surrogate in a \\u escape");
            }
            if (u == 0) return jfail(p, "\\u0000 in a string");
            put_utf8(d, &k, u);
            break;
        }
        default: return jfail(p, "bad escape in a string");
        }
    }
    d[k++] = '\0';
    t->text_used += k;
    *out = d;
    return DSMOE_OK;
}

static dsmoe_status jnumber(jparser *p, double *v) {
    size_t b = p->pos, i = p->pos;
    if (i < p->n && p->s[i] == '-') i++;
    if (i >= p->n || p->s[i] < '0' || p->s[i] > '9') return jfail(p, "bad number");
    if (p->s[i] == '0') {
        i++;
    } else {
        while (i < p->n && p->s[i] >= '0' && p->s[i] <= '9') i++;
    }
    if (i < p->n && p->s[i] == '.') {
        i++;
        if (i >= p->n || p->s[i] < '0' || p->s[i] > '9') return jfail(p, "bad number");
        while (i < p->n && p->s[i] >= '0' && p->s[i] <= '9') i++;
    }
    if (i < p->n && (p->s[i] == 'e' || p->s[i] == 'E')) {
        i++;
        if (i < p->n && (p->s[i] == '+' || p->s[i] == '-')) i++;
        if (i >= p->n || p->s[i] < '0' || p->s[i] > '9') return jfail(p, "bad number");
        while (i < p->n && p->s[i] >= '0' && p->s[i] <= '9') i++;
    }
    char tmp[64];
    if (i - b >= sizeof tmp) return jfail(p, "number too long");
    memcpy(tmp, p->s + b, i - b);
    tmp[i - b] = '\0';
    *v = strtod(tmp, NULL);
    if (!isfinite(*v)) return jfail(p, "number out of range");
    p->pos = i;
    return DSMOE_OK;
}

static int jword(jparser *p, const char *w) {
    size_t L = strlen(w);
    if (p->n - p->pos < L || memcmp(p->s + p->pos, w, L) != 0) return 0;
    p->pos += L;
    return 1;
}

static dsmoe_status jvalue(jparser *p, int32_t *out);

static dsmoe_status jcontainer(jparser *p, int obj, int32_t *out) {
    if (p->depth >= 64) return jfail(p, "nesting too deep");
    dsmoe_status st = jnode(p, obj ? DSMOE__JV_OBJ : DSMOE__JV_ARR, out);
    if (st) return st;
    int32_t self = *out, last = -1;
    char close = obj ? '}' : ']';
    p->depth++;
    p->pos++;
    jws(p);
    if (p->pos < p->n && p->s[p->pos] == close) {
        p->pos++;
        p->depth--;
        return DSMOE_OK;
    }
    for (;;) {
        const char *key = NULL;
        if (obj) {
            jws(p);
            if (p->pos >= p->n || p->s[p->pos] != '"') return jfail(p, "expected a member name");
            if ((st = jstring(p, &key))) return st;
            jws(p);
            if (p->pos >= p->n || p->s[p->pos] != ':') return jfail(p, "expected ':'");
            p->pos++;
        }
        int32_t child;
        if ((st = jvalue(p, &child))) return st;
        p->t->nodes[child].key = key;
        if (last < 0) p->t->nodes[self].first = child;
        else p->t->nodes[last].next = child;
        last = child;
        p->t->nodes[self].n++;
        jws(p);
        if (p->pos >= p->n) return jfail(p, obj ? "unterminated object" : "unterminated array");
        if (p->s[p->pos] == ',') {
            p->pos++;
            continue;
        }
        if (p->s[p->pos] == close) {
            p->pos++;
            break;
        }
        return jfail(p, obj ? "expected ',' or '}'" : "expected ',' or ']'");
    }
    p->depth--;
    return DSMOE_OK;
}

static dsmoe_status jvalue(jparser *p, int32_t *out) {
    jws(p);
    if (p->pos >= p->n) return jfail(p, "unexpected end of line");
    char c = p->s[p->pos];
    dsmoe_status st;
    if (c == '{' || c == '[') return jcontainer(p, c == '{', out);
    if (c == '"') {
        const char *s;
        if ((st = jstring(p, &s))) return st;
        if ((st = jnode(p, DSMOE__JV_STR, out))) return st;
        p->t->nodes[*out].str = s;
        return DSMOE_OK;
    }
    if (c == 't' || c == 'f' || c == 'n') {
        int ok = jword(p, "true") ? 1 : jword(p, "false") ? 2 : jword(p, "null") ? 3 : 0;
        if (!ok) return jfail(p, "bad literal");
        if ((st = jnode(p, ok == 3 ? DSMOE__JV_NULL : DSMOE__JV_BOOL, out))) return st;
        p->t->nodes[*out].num = ok == 1;
        return DSMOE_OK;
    }
    double v = 0;
    if ((st = jnumber(p, &v))) return st;
    if ((st = jnode(p, DSMOE__JV_NUM, out))) return st;
    p->t->nodes[*out].num = v;
    return DSMOE_OK;
}

dsmoe_status dsmoe__jtree_parse(dsmoe__jtree *t, const char *s, size_t n, const char *what) {
    t->n = 0;
    t->text_used = 0;
    if (t->text_cap < n + 1) {
        char *nt = realloc(t->text, n + 1);
        if (!nt) return DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "%s: out of memory", what);
        t->text = nt;
        t->text_cap = n + 1;
    }
    jparser p = {t, s, n, 0, what, 0};
    int32_t root;
    dsmoe_status st = jvalue(&p, &root);
    if (st) return st;
    jws(&p);
    if (p.pos != n) return jfail(&p, "text after the JSON value");
    return DSMOE_OK;
}

void dsmoe__jtree_free(dsmoe__jtree *t) {
    free(t->nodes);
    free(t->text);
    memset(t, 0, sizeof *t);
}

int32_t dsmoe__jv_get(const dsmoe__jtree *t, int32_t i, const char *key) {
    if (i < 0 || t->nodes[i].kind != DSMOE__JV_OBJ) return -1;
    for (int32_t c = t->nodes[i].first; c >= 0; c = t->nodes[c].next)
        if (strcmp(t->nodes[c].key, key) == 0) return c;
    return -1;
}

int32_t dsmoe__jv_at(const dsmoe__jtree *t, int32_t i, int32_t k) {
    if (i < 0 || t->nodes[i].kind != DSMOE__JV_ARR) return -1;
    int32_t c = t->nodes[i].first;
    while (c >= 0 && k-- > 0) c = t->nodes[c].next;
    return c;
}

/* ------------------------------------------------------------------ text -- */
void dsmoe__buf_put(dsmoe__buf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 4096;
        while (nc < b->n + n + 1) nc *= 2;
        char *ns = realloc(b->s, nc);
        if (!ns) {
            b->oom = 1;
            return;
        }
        b->s = ns;
        b->cap = nc;
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = '\0';
}

void dsmoe__buf_printf(dsmoe__buf *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (len < 0) return;
    if ((size_t)len < sizeof tmp) {
        dsmoe__buf_put(b, tmp, (size_t)len);
        return;
    }
    char *big = malloc((size_t)len + 1);
    if (!big) {
        b->oom = 1;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)len + 1, fmt, ap);
    va_end(ap);
    dsmoe__buf_put(b, big, (size_t)len);
    free(big);
}

void dsmoe__buf_xml(dsmoe__buf *b, const char *s) {
    if (!s) return;
    const unsigned char *u = (const unsigned char *)s;
    size_t n = strlen(s);
    for (size_t i = 0; i < n;) {
        unsigned char c = u[i];
        const char *rep = NULL;
        switch (c) {
        case '&': rep = "&amp;"; break;
        case '<': rep = "&lt;"; break;
        case '>': rep = "&gt;"; break;
        case '"': rep = "&quot;"; break;
        case '\'': rep = "&#39;"; break;
        default: break;
        }
        if (rep) {
            dsmoe__buf_put(b, rep, strlen(rep));
            i++;
            continue;
        }
        if (c < 0x20 && c != '\t' && c != '\n') {
            dsmoe__buf_put(b, "\xEF\xBF\xBD", 3);
            i++;
            continue;
        }
        size_t L = c < 0x80 ? 1 : dsmoe__utf8_seq(u + i, n - i);
        if (L == 0) {
            dsmoe__buf_put(b, "\xEF\xBF\xBD", 3);
            i++;
            continue;
        }
        dsmoe__buf_put(b, s + i, L);
        i += L;
    }
}

void dsmoe__buf_json_str(dsmoe__buf *b, const char *s) {
    dsmoe__buf_put(b, "\"", 1);
    const unsigned char *u = (const unsigned char *)(s ? s : "");
    size_t n = strlen((const char *)u);
    for (size_t i = 0; i < n;) {
        unsigned char c = u[i];
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            dsmoe__buf_put(b, e, 2);
            i++;
        } else if (c < 0x20 || c == '<' || c == '>' || c == '&') {
            /* < > & escaped too, so the text is safe inside HTML as well */
            dsmoe__buf_printf(b, "\\u%04x", c);
            i++;
        } else {
            size_t L = c < 0x80 ? 1 : dsmoe__utf8_seq(u + i, n - i);
            if (L == 0) {
                dsmoe__buf_put(b, "\\ufffd", 6);
                i++;
            } else {
                dsmoe__buf_put(b, (const char *)u + i, L);
                i += L;
            }
        }
    }
    dsmoe__buf_put(b, "\"", 1);
}

void dsmoe__buf_json_num(dsmoe__buf *b, double v) {
    if (!isfinite(v)) dsmoe__buf_put(b, "null", 4);
    else dsmoe__buf_printf(b, "%.17g", v);
}

void dsmoe__buf_free(dsmoe__buf *b) {
    free(b->s);
    memset(b, 0, sizeof *b);
}

dsmoe_status dsmoe__buf_save(const dsmoe__buf *b, const char *path) {
    if (b->oom) return DSMOE__FAIL(DSMOE_STATUS_OUT_OF_MEMORY, "%s: out of memory", path);
    dsmoe__atomic_file f;
    dsmoe_status st = dsmoe__atomic_open(&f, path);
    if (st) return st;
    st = dsmoe__atomic_write(&f, b->s ? b->s : "", b->n);
    if (st) {
        dsmoe__atomic_abort(&f);
        return st;
    }
    return dsmoe__atomic_commit(&f);
}
