/*
 * corpus.c — the byte-level training data: the built-in multi-domain corpus, generated
 * from a seed, and user UTF-8 text files; held-out documents; batches and windows.
 *
 * Everything is integer arithmetic on dsmoe_rng draws (no floating point, no locale),
 * so a seed gives the same bytes on every platform. Allocation happens only while a
 * corpus is built.
 */
#include "io/io_internal.h"
#include "train/train_internal.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *const domain_names[DSMOE_DOMAIN_COUNT] = {
    "arithmetic", "records", "markov", "copy-sort", "english", "text"};

const char *dsmoe_domain_name(int domain) {
    return domain >= 0 && domain < DSMOE_DOMAIN_COUNT ? domain_names[domain] : NULL;
}

int dsmoe_domain_from_name(const char *name) {
    for (int d = 0; name && d < DSMOE_DOMAIN_COUNT; d++)
        if (strcmp(name, domain_names[d]) == 0) return d;
    return -1;
}

void dsmoe_corpus_config_default(dsmoe_corpus_config *cfg) {
    if (!cfg) return;
    memset(cfg, 0, sizeof *cfg);
    cfg->seed = 1;
    cfg->tokens = 2000000;
    cfg->valid_fraction = 0.05;
}

struct dsmoe_corpus {
    uint16_t *tok[2];
    uint8_t *dom[2];
    int64_t len[2], cap[2], docs[2];
};

/* ------------------------------------------------------------- building -- */

/* A growable byte buffer for one document. */
typedef struct dbuf {
    char *p;
    int64_t n, cap;
    int oom;
} dbuf;

static void put(dbuf *b, const char *s, int64_t n) {
    if (b->oom) return;
    if (b->n + n > b->cap) {
        int64_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n) cap *= 2;
        char *p = (char *)realloc(b->p, (size_t)cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, (size_t)n);
    b->n += n;
}

static void puts_(dbuf *b, const char *s) { put(b, s, (int64_t)strlen(s)); }

static void putf_int(dbuf *b, long long v) {
    char s[32];
    int k = snprintf(s, sizeof s, "%lld", v);
    put(b, s, k);
}

/* Appends one document (BOS, bytes, EOS) to split s. */
static dsmoe_status corpus_add(dsmoe_corpus *c, int s, const char *bytes, int64_t n, int domain) {
    int64_t need = c->len[s] + n + 2;
    if (need > c->cap[s]) {
        int64_t cap = c->cap[s] ? c->cap[s] : 4096;
        while (cap < need) cap *= 2;
        uint16_t *t = (uint16_t *)realloc(c->tok[s], (size_t)cap * sizeof *t);
        if (t) c->tok[s] = t;
        uint8_t *d = (uint8_t *)realloc(c->dom[s], (size_t)cap);
        if (d) c->dom[s] = d;
        if (!t || !d) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "corpus: out of memory");
        c->cap[s] = cap;
    }
    uint16_t *t = c->tok[s] + c->len[s];
    uint8_t *d = c->dom[s] + c->len[s];
    t[0] = DSMOE_BYTE_VOCAB_BOS;
    for (int64_t i = 0; i < n; i++) t[i + 1] = (uint8_t)bytes[i];
    t[n + 1] = DSMOE_BYTE_VOCAB_EOS;
    memset(d, domain, (size_t)(n + 2));
    c->len[s] += n + 2;
    c->docs[s]++;
    return DSMOE_OK;
}

/* A uniform draw from [0, n) (n >= 1). */
static uint32_t below(dsmoe_rng *r, uint32_t n) { return (uint32_t)(dsmoe_rng_next(r) % n); }

/* --------------------------------------------------------------- domains -- */

static void gen_arithmetic(dbuf *b, dsmoe_rng *r) {
    static const long long pow10[] = {1, 10, 100, 1000};
    int lines = 1 + (int)below(r, 6);
    for (int i = 0; i < lines; i++) {
        int op = (int)below(r, 4);
        int digits = op == 2 ? 1 + (int)below(r, 2) : 1 + (int)below(r, 3);
        long long a = (long long)below(r, (uint32_t)pow10[digits]);
        long long x = (long long)below(r, (uint32_t)pow10[1 + below(r, (uint32_t)digits)]);
        if (op == 3) {
            long long m = (long long)below(r, 10);
            puts_(b, "(");
            putf_int(b, a);
            puts_(b, "+");
            putf_int(b, x);
            puts_(b, ")*");
            putf_int(b, m);
            puts_(b, "=");
            putf_int(b, (a + x) * m);
        } else {
            putf_int(b, a);
            puts_(b, op == 0 ? "+" : op == 1 ? "-" : "*");
            putf_int(b, x);
            puts_(b, "=");
            putf_int(b, op == 0 ? a + x : op == 1 ? a - x : a * x);
        }
        puts_(b, "\n");
    }
}

/* A lower-case pseudo-word of 1 .. 3 syllables. */
static void gen_word(dbuf *b, dsmoe_rng *r) {
    static const char cons[] = "bcdfghjklmnprstvwz", vow[] = "aeiou";
    int syl = 1 + (int)below(r, 3);
    for (int i = 0; i < syl; i++) {
        char s[2] = {cons[below(r, sizeof cons - 1)], vow[below(r, sizeof vow - 1)]};
        put(b, s, 2);
    }
}

static void gen_record(dbuf *b, dsmoe_rng *r, int depth) {
    puts_(b, "{\"id\":");
    putf_int(b, (long long)below(r, 100000));
    puts_(b, ",\"name\":\"");
    gen_word(b, r);
    puts_(b, "\"");
    if (below(r, 2)) {
        long long cents = (long long)below(r, 100000);
        char s[32];
        int k = snprintf(s, sizeof s, ",\"score\":%lld.%02lld", cents / 100, cents % 100);
        put(b, s, k);
    }
    if (below(r, 2)) {
        int n = (int)below(r, 4);
        puts_(b, ",\"tags\":[");
        for (int i = 0; i < n; i++) {
            if (i) puts_(b, ",");
            puts_(b, "\"");
            gen_word(b, r);
            puts_(b, "\"");
        }
        puts_(b, "]");
    }
    if (below(r, 3) == 0) puts_(b, below(r, 2) ? ",\"ok\":true" : ",\"ok\":false");
    if (depth < 3 && below(r, 3) == 0) {
        puts_(b, ",\"child\":");
        gen_record(b, r, depth + 1);
    }
    puts_(b, "}");
}

static void gen_records(dbuf *b, dsmoe_rng *r) {
    int n = 1 + (int)below(r, 3);
    for (int i = 0; i < n; i++) {
        gen_record(b, r, 1);
        puts_(b, "\n");
    }
}

/* The Markov language: 12 letters; context (previous two letters, 12 = word start)
 * has three successors with weights 6 : 3 : 1, drawn from the corpus seed. */
#define MK_LETTERS 12
static const char mk_alpha[MK_LETTERS + 1] = "AEIOBDKLMNRT";

typedef struct markov {
    uint8_t next[MK_LETTERS + 1][MK_LETTERS + 1][3];
} markov;

static void markov_init(markov *m, uint64_t seed) {
    dsmoe_rng r;
    dsmoe_rng_seed(&r, seed ^ 0x6d61726b6f76ull);
    for (int a = 0; a <= MK_LETTERS; a++)
        for (int c = 0; c <= MK_LETTERS; c++)
            for (int k = 0; k < 3; k++) m->next[a][c][k] = (uint8_t)below(&r, MK_LETTERS);
}

static void gen_markov(dbuf *b, dsmoe_rng *r, const markov *m) {
    int sentences = 1 + (int)below(r, 4);
    for (int s = 0; s < sentences; s++) {
        int words = 3 + (int)below(r, 8);
        for (int w = 0; w < words; w++) {
            int len = 2 + (int)below(r, 7), p2 = MK_LETTERS, p1 = MK_LETTERS;
            if (w) puts_(b, " ");
            for (int i = 0; i < len; i++) {
                uint32_t u = below(r, 10);
                int k = u < 6 ? 0 : u < 9 ? 1 : 2;
                int ch = m->next[p2][p1][k];
                put(b, &mk_alpha[ch], 1);
                p2 = p1;
                p1 = ch;
            }
        }
        puts_(b, s + 1 < sentences ? ". " : ".\n");
    }
}

static int cmp_char(const void *a, const void *b) { return *(const char *)a - *(const char *)b; }

static void gen_copy_sort(dbuf *b, dsmoe_rng *r) {
    int lines = 1 + (int)below(r, 5);
    for (int i = 0; i < lines; i++) {
        int task = (int)below(r, 3), n = 3 + (int)below(r, 8);
        char s[16] = {0}, o[16] = {0};
        for (int k = 0; k < n; k++) s[k] = (char)('a' + below(r, 26));
        memcpy(o, s, (size_t)n);
        if (task == 1)
            for (int k = 0; k < n; k++) o[k] = s[n - 1 - k];
        else if (task == 2)
            qsort(o, (size_t)n, 1, cmp_char);
        puts_(b, task == 0 ? "copy " : task == 1 ? "rev " : "sort ");
        put(b, s, n);
        puts_(b, "|");
        put(b, o, n);
        puts_(b, "\n");
    }
}

/* ----------------------------------------------------------------- UTF-8 -- */

int64_t dsmoe__utf8_invalid_at(const uint8_t *s, int64_t n) {
    for (int64_t i = 0; i < n;) {
        size_t k = dsmoe__utf8_seq(s + i, (size_t)(n - i));
        if (k == 0) return i;
        i += (int64_t)k;
    }
    return -1;
}

/* ------------------------------------------------------ text and fortunes -- */

/* A whole file, at most 1 GiB (malloc'd). */
static dsmoe_status read_file(const char *path, char **out, int64_t *n) {
    *out = NULL;
    *n = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return dsmoe__error(DSMOE_STATUS_IO, "%s: %s", path, strerror(errno));
    dbuf b = {0};
    char chunk[65536];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) {
        put(&b, chunk, (int64_t)got);
        if (b.n > ((int64_t)1 << 30)) {
            fclose(f);
            free(b.p);
            return dsmoe__error(DSMOE_STATUS_IO, "%s: larger than 1 GiB", path);
        }
    }
    int err = ferror(f);
    fclose(f);
    if (err || b.oom) {
        free(b.p);
        return dsmoe__error(err ? DSMOE_STATUS_IO : DSMOE_STATUS_OUT_OF_MEMORY, "%s: %s", path,
                            err ? "read error" : "out of memory");
    }
    *out = b.p;
    *n = b.n;
    return DSMOE_OK;
}

/* Entries of the fortune files under dir: the list of [start, end) byte ranges into one
 * text. Files in name order; ".dat" / ".u8" files, dot files and entries that are not
 * UTF-8 are skipped. */
typedef struct fortunes {
    char *text;
    int64_t n_text;
    int64_t (*ent)[2];
    int64_t n_ent;
} fortunes;

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

static void fortunes_free(fortunes *f) {
    free(f->text);
    free(f->ent);
    memset(f, 0, sizeof *f);
}

static dsmoe_status fortunes_load(const char *dir, fortunes *fo) {
    memset(fo, 0, sizeof *fo);
    DIR *d = opendir(dir);
    if (!d) return DSMOE_OK; /* no folder: no entries */
    char *names[512] = {0};
    int nn = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL && nn < 512;) {
        if (e->d_name[0] == '.' || ends_with(e->d_name, ".dat") || ends_with(e->d_name, ".u8"))
            continue;
        names[nn] = strdup(e->d_name);
        if (names[nn]) nn++;
    }
    closedir(d);
    qsort(names, (size_t)nn, sizeof names[0], cmp_str);
    dbuf text = {0};
    int64_t cap = 0;
    dsmoe_status st = DSMOE_OK;
    for (int i = 0; i < nn && st == DSMOE_OK; i++) {
        char path[4096];
        struct stat sb;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (stat(path, &sb) != 0 || !S_ISREG(sb.st_mode)) continue;
        char *buf;
        int64_t n;
        if (read_file(path, &buf, &n) != DSMOE_OK) continue;
        /* entries end at a line "%" */
        int64_t start = 0;
        for (int64_t k = 0; k <= n; k++) {
            int sep = k == n || (buf[k] == '%' && (k == 0 || buf[k - 1] == '\n') &&
                                 (k + 1 == n || buf[k + 1] == '\n'));
            if (!sep) continue;
            int64_t a = start, z = k;
            while (a < z && (buf[a] == '\n' || buf[a] == ' ' || buf[a] == '\t')) a++;
            while (z > a && (buf[z - 1] == '\n' || buf[z - 1] == ' ' || buf[z - 1] == '\t')) z--;
            start = k + 2;
            if (z - a < 8 || z - a > 4096 ||
                dsmoe__utf8_invalid_at((const uint8_t *)buf + a, z - a) >= 0)
                continue;
            if (fo->n_ent == cap) {
                cap = cap ? cap * 2 : 1024;
                int64_t(*g)[2] = (int64_t(*)[2])realloc(fo->ent, (size_t)cap * sizeof *g);
                if (!g) {
                    st = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "corpus: out of memory");
                    break;
                }
                fo->ent = g;
            }
            fo->ent[fo->n_ent][0] = text.n;
            put(&text, buf + a, z - a);
            put(&text, "\n", 1);
            fo->ent[fo->n_ent][1] = text.n;
            fo->n_ent++;
        }
        free(buf);
    }
    for (int i = 0; i < nn; i++) free(names[i]);
    if (text.oom && st == DSMOE_OK)
        st = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "corpus: out of memory");
    fo->text = text.p;
    fo->n_text = text.n;
    if (st != DSMOE_OK) fortunes_free(fo);
    return st;
}

/* -------------------------------------------------------------- corpora -- */

void dsmoe_corpus_free(dsmoe_corpus *c) {
    if (!c) return;
    for (int s = 0; s < 2; s++) {
        free(c->tok[s]);
        free(c->dom[s]);
    }
    free(c);
}

static dsmoe_status check_common(const dsmoe_corpus_config *cfg, int files) {
    if (!(cfg->valid_fraction >= 0.0 && cfg->valid_fraction <= 0.5))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "corpus: valid_fraction must be in [0, 0.5], found %g",
                            cfg->valid_fraction);
    if (files ? (cfg->tokens < 0 || cfg->tokens > ((int64_t)1 << 31))
              : (cfg->tokens < 1024 || cfg->tokens > ((int64_t)1 << 31)))
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "corpus: tokens must be in [%d, 2^31], found %lld",
                            files ? 0 : 1024, (long long)cfg->tokens);
    return DSMOE_OK;
}

/* Whether a document goes to the validation split: one draw of its own stream, as an
 * integer threshold on 2^32 (no floating point in the decision). */
static int goes_valid(dsmoe_rng *split_rng, double fraction) {
    uint64_t thr = (uint64_t)(fraction * 4294967296.0);
    return (dsmoe_rng_next(split_rng) >> 32) < thr;
}

dsmoe_status dsmoe_corpus_builtin(const dsmoe_corpus_config *cfg, dsmoe_corpus **out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "corpus: NULL output");
    *out = NULL;
    if (!cfg) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "corpus: NULL config");
    dsmoe_status st = check_common(cfg, 0);
    if (st != DSMOE_OK) return st;
    const uint32_t all = (1u << DSMOE_DOMAIN_TEXT) - 1;
    if (cfg->domains & ~all)
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                            "corpus: domains has bits outside the built-in domains (0x%x)",
                            cfg->domains);
    fortunes fo;
    const char *fdir = cfg->fortunes_dir ? cfg->fortunes_dir : "/usr/share/games/fortunes";
    uint32_t want = cfg->domains ? cfg->domains : all;
    if (want & (1u << DSMOE_DOMAIN_ENGLISH)) {
        st = fortunes_load(fdir, &fo);
        if (st != DSMOE_OK) return st;
        if (fo.n_ent < 2) {
            fortunes_free(&fo);
            if (cfg->domains & (1u << DSMOE_DOMAIN_ENGLISH))
                return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG,
                                    "corpus: the english domain needs fortune files, none in %s", fdir);
            want &= ~(1u << DSMOE_DOMAIN_ENGLISH);
        }
    } else {
        memset(&fo, 0, sizeof fo);
    }
    int doms[DSMOE_DOMAIN_COUNT], nd = 0;
    for (int d = 0; d < DSMOE_DOMAIN_TEXT; d++)
        if (want & (1u << d)) doms[nd++] = d;
    if (nd == 0) {
        fortunes_free(&fo);
        return dsmoe__error(DSMOE_STATUS_INVALID_CONFIG, "corpus: no domain enabled");
    }
    /* fortune entries split once, by their own stream */
    uint8_t *ent_valid = NULL;
    int64_t ent_count[2] = {0, 0};
    if (fo.n_ent) {
        ent_valid = (uint8_t *)malloc((size_t)fo.n_ent);
        if (!ent_valid) {
            fortunes_free(&fo);
            return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "corpus: out of memory");
        }
        dsmoe_rng er;
        dsmoe_rng_seed(&er, cfg->seed ^ 0x656e676c697368ull);
        for (int64_t i = 0; i < fo.n_ent; i++) {
            ent_valid[i] = (uint8_t)goes_valid(&er, cfg->valid_fraction);
            ent_count[ent_valid[i]]++;
        }
        if (ent_count[0] == 0 || (cfg->valid_fraction > 0 && ent_count[1] == 0)) {
            /* too few entries for the split: the first goes one way, the rest the other */
            for (int64_t i = 0; i < fo.n_ent; i++) ent_valid[i] = cfg->valid_fraction > 0 && i == 0;
            ent_count[1] = cfg->valid_fraction > 0;
            ent_count[0] = fo.n_ent - ent_count[1];
        }
    }
    dsmoe_corpus *c = (dsmoe_corpus *)calloc(1, sizeof *c);
    markov mk;
    markov_init(&mk, cfg->seed);
    dsmoe_rng split_rng, dom_rng, gen_rng;
    dsmoe_rng_seed(&split_rng, cfg->seed ^ 0x73706c6974ull);
    dsmoe_rng_seed(&dom_rng, cfg->seed ^ 0x646f6dull);
    dsmoe_rng_seed(&gen_rng, cfg->seed);
    dbuf b = {0};
    st = c ? DSMOE_OK : dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "corpus: out of memory");
    while (st == DSMOE_OK && c->len[0] + c->len[1] < cfg->tokens) {
        int s = goes_valid(&split_rng, cfg->valid_fraction);
        int d = doms[below(&dom_rng, (uint32_t)nd)];
        b.n = 0;
        switch (d) {
        case DSMOE_DOMAIN_ARITHMETIC: gen_arithmetic(&b, &gen_rng); break;
        case DSMOE_DOMAIN_RECORDS: gen_records(&b, &gen_rng); break;
        case DSMOE_DOMAIN_MARKOV: gen_markov(&b, &gen_rng, &mk); break;
        case DSMOE_DOMAIN_COPY_SORT: gen_copy_sort(&b, &gen_rng); break;
        default: { /* english: an entry of this split */
            int64_t k = (int64_t)(dsmoe_rng_next(&gen_rng) % (uint64_t)ent_count[s]);
            int64_t i = 0;
            for (;; i++)
                if (ent_valid[i] == s && k-- == 0) break;
            put(&b, fo.text + fo.ent[i][0], fo.ent[i][1] - fo.ent[i][0]);
            break;
        }
        }
        if (b.oom) st = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "corpus: out of memory");
        else st = corpus_add(c, s, b.p, b.n, d);
    }
    free(b.p);
    free(ent_valid);
    fortunes_free(&fo);
    if (st != DSMOE_OK) {
        dsmoe_corpus_free(c);
        return st;
    }
    *out = c;
    return DSMOE_OK;
}

/* Cuts text[0..n) into documents: paragraphs (blank-line separated), each at most
 * DOC_MAX bytes, cut at a line end where one exists and never inside a UTF-8 sequence. */
#define DOC_MAX 4096

dsmoe_status dsmoe_corpus_from_files(const char *const *paths, int n, const dsmoe_corpus_config *cfg,
                                     dsmoe_corpus **out) {
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "corpus: NULL output");
    *out = NULL;
    if (!paths || n < 1 || !cfg)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "corpus: no text files given");
    dsmoe_status st = check_common(cfg, 1);
    if (st != DSMOE_OK) return st;
    dsmoe_corpus *c = (dsmoe_corpus *)calloc(1, sizeof *c);
    if (!c) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "corpus: out of memory");
    dsmoe_rng split_rng;
    dsmoe_rng_seed(&split_rng, cfg->seed ^ 0x73706c6974ull);
    const int64_t cap = cfg->tokens > 0 ? cfg->tokens : INT64_MAX;
    for (int f = 0; f < n && st == DSMOE_OK; f++) {
        char *text;
        int64_t len;
        if (!paths[f]) {
            st = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "corpus: text file %d is NULL", f);
            break;
        }
        st = read_file(paths[f], &text, &len);
        if (st != DSMOE_OK) break;
        int64_t bad = dsmoe__utf8_invalid_at((const uint8_t *)text, len);
        if (len == 0 || bad >= 0) {
            st = len == 0 ? dsmoe__error(DSMOE_STATUS_FORMAT, "%s: empty", paths[f])
                          : dsmoe__error(DSMOE_STATUS_FORMAT, "%s: not UTF-8 text (byte offset %lld)",
                                         paths[f], (long long)bad);
            free(text);
            break;
        }
        int64_t i = 0;
        while (i < len && st == DSMOE_OK && c->len[0] + c->len[1] < cap) {
            while (i < len && text[i] == '\n') i++; /* blank lines between paragraphs */
            if (i >= len) break;
            int64_t end = i;
            while (end < len && !(text[end] == '\n' && end + 1 < len && text[end + 1] == '\n')) end++;
            if (end < len) end++; /* keep the paragraph's last newline */
            if (end - i > DOC_MAX) {
                int64_t cut = i + DOC_MAX;
                while (cut > i && text[cut - 1] != '\n') cut--;
                if (cut == i) { /* no line end: cut at a character boundary */
                    cut = i + DOC_MAX;
                    while (cut > i && (text[cut] & 0xC0) == 0x80) cut--;
                }
                end = cut;
            }
            st = corpus_add(c, goes_valid(&split_rng, cfg->valid_fraction), text + i, end - i,
                            DSMOE_DOMAIN_TEXT);
            i = end;
        }
        free(text);
    }
    if (st == DSMOE_OK && c->len[0] == 0)
        st = dsmoe__error(DSMOE_STATUS_FORMAT, "corpus: the text files hold no training document");
    if (st != DSMOE_OK) {
        dsmoe_corpus_free(c);
        return st;
    }
    *out = c;
    return DSMOE_OK;
}

/* ------------------------------------------------------------- accessors -- */

static int split_ok(const dsmoe_corpus *c, dsmoe_split s) {
    return c && (s == DSMOE_SPLIT_TRAIN || s == DSMOE_SPLIT_VALID);
}

int64_t dsmoe_corpus_length(const dsmoe_corpus *c, dsmoe_split s) {
    return split_ok(c, s) ? c->len[s] : 0;
}
const uint16_t *dsmoe_corpus_tokens(const dsmoe_corpus *c, dsmoe_split s) {
    return split_ok(c, s) ? c->tok[s] : NULL;
}
const uint8_t *dsmoe_corpus_domains(const dsmoe_corpus *c, dsmoe_split s) {
    return split_ok(c, s) ? c->dom[s] : NULL;
}
int64_t dsmoe_corpus_documents(const dsmoe_corpus *c, dsmoe_split s) {
    return split_ok(c, s) ? c->docs[s] : 0;
}

void dsmoe_corpus_domain_counts(const dsmoe_corpus *c, dsmoe_split s, int64_t *counts) {
    if (!counts) return;
    for (int d = 0; d < DSMOE_DOMAIN_COUNT; d++) counts[d] = 0;
    if (!split_ok(c, s)) return;
    for (int64_t i = 0; i < c->len[s]; i++) counts[c->dom[s][i]]++;
}

dsmoe_status dsmoe_corpus_sample(const dsmoe_corpus *c, dsmoe_split s, dsmoe_rng *rng, int32_t B,
                                 int32_t T, int32_t *tokens, uint8_t *domains) {
    if (!split_ok(c, s) || !rng || !tokens || B < 1 || T < 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "corpus sample: NULL argument, bad split or B, T < 1");
    if (c->len[s] < (int64_t)T + 1)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT,
                            "corpus sample: the %s split has %lld tokens, fewer than T + 1 = %lld",
                            s == DSMOE_SPLIT_TRAIN ? "training" : "validation", (long long)c->len[s],
                            (long long)T + 1);
    const uint64_t starts = (uint64_t)(c->len[s] - T);
    for (int32_t b = 0; b < B; b++) {
        int64_t p = (int64_t)(dsmoe_rng_next(rng) % starts);
        int32_t *t = tokens + (int64_t)b * (T + 1);
        for (int32_t k = 0; k <= T; k++) t[k] = c->tok[s][p + k];
        if (domains) memcpy(domains + (int64_t)b * (T + 1), c->dom[s] + p, (size_t)T + 1);
    }
    return DSMOE_OK;
}

int64_t dsmoe_corpus_window_count(const dsmoe_corpus *c, dsmoe_split s, int32_t T) {
    if (!split_ok(c, s) || T < 1 || c->len[s] < 2) return 0;
    return (c->len[s] - 1 + T - 1) / T;
}

int64_t dsmoe_corpus_window(const dsmoe_corpus *c, dsmoe_split s, int32_t T, int64_t i,
                            int32_t *tokens, uint8_t *domains) {
    int64_t nw = dsmoe_corpus_window_count(c, s, T);
    if (!tokens || i < 0 || i >= nw) {
        dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "corpus window: %lld is out of range (%lld windows)",
                     (long long)i, (long long)nw);
        return -1;
    }
    int64_t p = i * T, n = c->len[s] - p < (int64_t)T + 1 ? c->len[s] - p : (int64_t)T + 1;
    for (int64_t k = 0; k <= T; k++) {
        tokens[k] = k < n ? c->tok[s][p + k] : DSMOE_BYTE_VOCAB_PAD;
        if (domains) domains[k] = k < n ? c->dom[s][p + k] : 255;
    }
    return n;
}
