/*
 * test_corpus.c — the training data (src/train/corpus.c): the built-in corpus is
 * deterministic, made of well-formed documents whose contents are checked here
 * independently of the generators (arithmetic answers recomputed, records parsed for
 * balance, copy / reverse / sort tasks redone, the Markov language's order-2 sparsity),
 * split by whole documents with stable assignment; text files become UTF-8 documents;
 * batches and evaluation windows are exact slices of a split; bad input is refused.
 */
#include "train/train_internal.h"
#include "testlib.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static dsmoe_corpus *build(uint64_t seed, int64_t tokens, uint32_t domains, const char *fdir) {
    dsmoe_corpus_config cc;
    dsmoe_corpus_config_default(&cc);
    cc.seed = seed;
    cc.tokens = tokens;
    cc.domains = domains;
    cc.fortunes_dir = fdir ? fdir : tl_tmp("no-fortunes-here");
    dsmoe_corpus *c = NULL;
    ASSERT_OK(dsmoe_corpus_builtin(&cc, &c));
    return c;
}

/* A fake fortunes folder: fortunes (8 entries), fortunes.dat (ignored), art (3). */
static const char *fortune_dir(void) {
    static char dir[4096];
    snprintf(dir, sizeof dir, "%s", tl_tmp("fortunes"));
    mkdir(dir, 0700);
    char path[4200];
    snprintf(path, sizeof path, "%s/fortunes", dir);
    FILE *f = fopen(path, "w");
    for (int i = 0; i < 8; i++) fprintf(f, "Entry number %d of the fortunes.\n  -- Someone\n%%\n", i);
    fclose(f);
    snprintf(path, sizeof path, "%s/fortunes.dat", dir);
    f = fopen(path, "w");
    fputs("\x01\x02 binary index, must be skipped\n%\nanother non-entry here\n", f);
    fclose(f);
    snprintf(path, sizeof path, "%s/art", dir);
    f = fopen(path, "w");
    fputs("Art is long, and time is fleeting.\n%\nCaf\xc3\xa9 au lait, s'il vous pla\xc3\xaet.\n%\n"
          "Bad byte \xff here\n%\n", f);
    fclose(f);
    return dir;
}

/* Calls fn(split, doc bytes, n, domain) for every document; checks the framing. */
typedef void (*doc_fn)(int s, const char *b, int64_t n, int d, void *ctx);

static int64_t each_doc(const dsmoe_corpus *c, int s, doc_fn fn, void *ctx) {
    const uint16_t *t = dsmoe_corpus_tokens(c, (dsmoe_split)s);
    const uint8_t *dm = dsmoe_corpus_domains(c, (dsmoe_split)s);
    int64_t n = dsmoe_corpus_length(c, (dsmoe_split)s), docs = 0;
    char *buf = (char *)malloc((size_t)n + 1);
    for (int64_t i = 0; i < n;) {
        if (t[i] != DSMOE_BYTE_VOCAB_BOS) {
            TL_FAIL("split %d: token %lld is %d, not BOS", s, (long long)i, t[i]);
            break;
        }
        int64_t j = i + 1, k = 0;
        while (j < n && t[j] < 256) {
            if (dm[j] != dm[i]) TL_FAIL("domain changes inside a document at %lld", (long long)j);
            buf[k++] = (char)t[j++];
        }
        if (j >= n || t[j] != DSMOE_BYTE_VOCAB_EOS || dm[j] != dm[i]) {
            TL_FAIL("split %d: document at %lld does not end with EOS", s, (long long)i);
            break;
        }
        buf[k] = '\0';
        if (dsmoe__utf8_invalid_at((const uint8_t *)buf, k) >= 0) TL_FAIL("document not UTF-8");
        if (fn) fn(s, buf, k, dm[i], ctx);
        docs++;
        i = j + 1;
    }
    free(buf);
    ASSERT_EQ_INT(docs, dsmoe_corpus_documents(c, (dsmoe_split)s));
    return docs;
}

static void test_names(void) {
    for (int d = 0; d < DSMOE_DOMAIN_COUNT; d++)
        ASSERT_EQ_INT(dsmoe_domain_from_name(dsmoe_domain_name(d)), d);
    ASSERT_TRUE(dsmoe_domain_name(DSMOE_DOMAIN_COUNT) == NULL);
    ASSERT_EQ_INT(dsmoe_domain_from_name("poetry"), -1);
    ASSERT_EQ_INT(DSMOE_BYTE_VOCAB_SIZE % 4, 0);
}

static void test_deterministic(void) {
    dsmoe_corpus *a = build(5, 50000, 0, NULL), *b = build(5, 50000, 0, NULL), *c = build(6, 50000, 0, NULL);
    if (!a || !b || !c) goto out;
    for (int s = 0; s < 2; s++) {
        int64_t n = dsmoe_corpus_length(a, (dsmoe_split)s);
        ASSERT_EQ_INT(n, dsmoe_corpus_length(b, (dsmoe_split)s));
        ASSERT_TRUE(memcmp(dsmoe_corpus_tokens(a, (dsmoe_split)s), dsmoe_corpus_tokens(b, (dsmoe_split)s),
                           (size_t)n * 2) == 0);
        ASSERT_TRUE(memcmp(dsmoe_corpus_domains(a, (dsmoe_split)s), dsmoe_corpus_domains(b, (dsmoe_split)s),
                           (size_t)n) == 0);
    }
    int64_t n = dsmoe_corpus_length(a, DSMOE_SPLIT_TRAIN);
    if (n > 1000 && dsmoe_corpus_length(c, DSMOE_SPLIT_TRAIN) > 1000)
        ASSERT_TRUE(memcmp(dsmoe_corpus_tokens(a, DSMOE_SPLIT_TRAIN), dsmoe_corpus_tokens(c, DSMOE_SPLIT_TRAIN),
                           2000) != 0);
    int64_t total = n + dsmoe_corpus_length(a, DSMOE_SPLIT_VALID);
    ASSERT_TRUE(total >= 50000 && total < 50000 + 4096);
out:
    dsmoe_corpus_free(a);
    dsmoe_corpus_free(b);
    dsmoe_corpus_free(c);
}

/* ------------------------------------------------------- content checks -- */

typedef struct stats {
    int64_t docs[2][DSMOE_DOMAIN_COUNT];
    int64_t lines_checked[DSMOE_DOMAIN_COUNT];
    uint16_t succ[13][13]; /* Markov successor sets (bit masks over 12 letters) */
    int english_seen[2][16];
} stats;

static int64_t parse_int(const char **p) {
    char *e;
    long long v = strtoll(*p, &e, 10);
    if (e == *p) TL_FAIL("expected a number at '%.20s'", *p);
    *p = e;
    return v;
}

static void check_arith_line(const char *l, stats *st) {
    const char *p = l;
    int64_t got, want;
    if (*p == '(') {
        p++;
        int64_t a = parse_int(&p);
        ASSERT_TRUE(*p == '+');
        p++;
        int64_t b = parse_int(&p);
        ASSERT_TRUE(p[0] == ')' && p[1] == '*');
        p += 2;
        want = (a + b) * parse_int(&p);
    } else {
        int64_t a = parse_int(&p);
        char op = *p++;
        int64_t b = parse_int(&p);
        ASSERT_TRUE(op == '+' || op == '-' || op == '*');
        want = op == '+' ? a + b : op == '-' ? a - b : a * b;
    }
    ASSERT_TRUE(*p == '=');
    p++;
    got = parse_int(&p);
    if (got != want) TL_FAIL("arithmetic line '%s': %lld != %lld", l, (long long)got, (long long)want);
    ASSERT_TRUE(*p == '\0');
    st->lines_checked[DSMOE_DOMAIN_ARITHMETIC]++;
}

static int cmp_c(const void *a, const void *b) { return *(const char *)a - *(const char *)b; }

static void check_task_line(const char *l, stats *st) {
    const char *sp = strchr(l, ' '), *bar = strchr(l, '|');
    if (!sp || !bar) {
        TL_FAIL("task line '%s'", l);
        return;
    }
    size_t n = (size_t)(bar - sp - 1);
    char in[32], out[32];
    ASSERT_TRUE(n >= 3 && n <= 10 && strlen(bar + 1) == n);
    if (n > 10) return;
    memcpy(in, sp + 1, n);
    memcpy(out, in, n);
    if (strncmp(l, "rev ", 4) == 0)
        for (size_t k = 0; k < n; k++) out[k] = in[n - 1 - k];
    else if (strncmp(l, "sort ", 5) == 0)
        qsort(out, n, 1, cmp_c);
    else
        ASSERT_TRUE(strncmp(l, "copy ", 5) == 0);
    if (memcmp(out, bar + 1, n) != 0) TL_FAIL("task line '%s' is wrong", l);
    st->lines_checked[DSMOE_DOMAIN_COPY_SORT]++;
}

static void check_record_line(const char *l, stats *st) {
    int depth = 0, maxd = 0, inq = 0;
    for (const char *p = l; *p; p++) {
        if (*p == '"') inq = !inq;
        if (inq) continue;
        if (*p == '{' || *p == '[') depth++;
        if (*p == '}' || *p == ']') depth--;
        if (depth < 0) TL_FAIL("record '%s' closes too much", l);
        if (*p == '{' && depth > maxd) maxd = depth;
    }
    ASSERT_TRUE(depth == 0 && !inq && l[0] == '{' && maxd <= 3);
    ASSERT_TRUE(strncmp(l, "{\"id\":", 6) == 0);
    st->lines_checked[DSMOE_DOMAIN_RECORDS]++;
}

static void check_markov(const char *b, stats *st) {
    static const char alpha[] = "AEIOBDKLMNRT";
    int p2 = 12, p1 = 12;
    for (const char *p = b; *p; p++) {
        const char *at = strchr(alpha, *p);
        if (*p && at) {
            int ch = (int)(at - alpha);
            st->succ[p2][p1] |= (uint16_t)(1u << ch);
            p2 = p1;
            p1 = ch;
        } else if (*p == ' ' || *p == '.' || *p == '\n') {
            p2 = p1 = 12;
        } else {
            TL_FAIL("markov byte 0x%02x", (unsigned char)*p);
        }
    }
    st->lines_checked[DSMOE_DOMAIN_MARKOV]++;
}

static void check_doc(int s, const char *b, int64_t n, int d, void *ctx) {
    stats *st = (stats *)ctx;
    st->docs[s][d]++;
    ASSERT_TRUE(n > 0 && b[n - 1] == '\n');
    if (d == DSMOE_DOMAIN_MARKOV) {
        check_markov(b, st);
        return;
    }
    if (d == DSMOE_DOMAIN_ENGLISH) {
        int k;
        if (sscanf(b, "Entry number %d", &k) == 1 && k >= 0 && k < 8) st->english_seen[s][k] = 1;
        else if (strncmp(b, "Art is long", 11) == 0) st->english_seen[s][8] = 1;
        else if (strncmp(b, "Caf\xc3\xa9", 5) == 0) st->english_seen[s][9] = 1;
        else TL_FAIL("english document '%s' is no fortune entry", b);
        return;
    }
    char *copy = (char *)malloc((size_t)n + 1);
    memcpy(copy, b, (size_t)n + 1);
    for (char *l = strtok(copy, "\n"); l; l = strtok(NULL, "\n")) {
        if (d == DSMOE_DOMAIN_ARITHMETIC) check_arith_line(l, st);
        else if (d == DSMOE_DOMAIN_COPY_SORT) check_task_line(l, st);
        else if (d == DSMOE_DOMAIN_RECORDS) check_record_line(l, st);
        else TL_FAIL("domain %d in the built-in corpus", d);
    }
    free(copy);
}

static void test_contents(void) {
    const char *fdir = fortune_dir();
    dsmoe_corpus *c = build(11, 400000, 0, fdir);
    if (!c) return;
    stats *st = (stats *)calloc(1, sizeof *st);
    int64_t docs = each_doc(c, 0, check_doc, st) + each_doc(c, 1, check_doc, st);
    /* every built-in domain, in equal shares of documents (binomial spread ~1.5%) */
    for (int d = 0; d < DSMOE_DOMAIN_TEXT; d++) {
        double share = (double)(st->docs[0][d] + st->docs[1][d]) / (double)docs;
        if (share < 0.17 || share > 0.23) TL_FAIL("domain %s has %.3f of the documents", dsmoe_domain_name(d), share);
    }
    ASSERT_EQ_INT(st->docs[0][DSMOE_DOMAIN_TEXT] + st->docs[1][DSMOE_DOMAIN_TEXT], 0);
    for (int d = 0; d < DSMOE_DOMAIN_ENGLISH; d++)
        if (st->lines_checked[d] < 500) TL_FAIL("%s: %lld lines checked", dsmoe_domain_name(d), (long long)st->lines_checked[d]);
    /* order 2 with three successors per context */
    for (int a = 0; a < 13; a++)
        for (int b = 0; b < 13; b++) ASSERT_TRUE(__builtin_popcount(st->succ[a][b]) <= 3);
    /* the held-out documents: about 5%, and no fortune entry on both sides */
    int64_t nv = dsmoe_corpus_documents(c, DSMOE_SPLIT_VALID);
    ASSERT_TRUE(nv > 0.04 * docs && nv < 0.06 * docs);
    int train_entries = 0;
    for (int k = 0; k < 10; k++) {
        ASSERT_TRUE(!(st->english_seen[0][k] && st->english_seen[1][k]));
        train_entries += st->english_seen[0][k];
    }
    ASSERT_TRUE(train_entries >= 5); /* the bad-byte entry and the .dat file never appear */
    int64_t counts[DSMOE_DOMAIN_COUNT], sum = 0;
    dsmoe_corpus_domain_counts(c, DSMOE_SPLIT_TRAIN, counts);
    for (int d = 0; d < DSMOE_DOMAIN_COUNT; d++) sum += counts[d];
    ASSERT_EQ_INT(sum, dsmoe_corpus_length(c, DSMOE_SPLIT_TRAIN));
    free(st);
    dsmoe_corpus_free(c);
}

/* A smaller corpus of the same seed is a prefix of a larger one, split by split. */
static void test_prefix_stable(void) {
    dsmoe_corpus *a = build(3, 20000, 0, NULL), *b = build(3, 80000, 0, NULL);
    if (!a || !b) goto out;
    for (int s = 0; s < 2; s++) {
        int64_t n = dsmoe_corpus_length(a, (dsmoe_split)s);
        ASSERT_TRUE(n <= dsmoe_corpus_length(b, (dsmoe_split)s));
        ASSERT_TRUE(memcmp(dsmoe_corpus_tokens(a, (dsmoe_split)s), dsmoe_corpus_tokens(b, (dsmoe_split)s),
                           (size_t)n * 2) == 0);
    }
out:
    dsmoe_corpus_free(a);
    dsmoe_corpus_free(b);
}

static void test_domains_mask(void) {
    dsmoe_corpus *c = build(2, 20000, (1u << DSMOE_DOMAIN_ARITHMETIC) | (1u << DSMOE_DOMAIN_MARKOV), NULL);
    if (!c) return;
    int64_t k[DSMOE_DOMAIN_COUNT];
    dsmoe_corpus_domain_counts(c, DSMOE_SPLIT_TRAIN, k);
    ASSERT_TRUE(k[DSMOE_DOMAIN_ARITHMETIC] > 0 && k[DSMOE_DOMAIN_MARKOV] > 0);
    ASSERT_EQ_INT(k[DSMOE_DOMAIN_RECORDS] + k[DSMOE_DOMAIN_COPY_SORT] + k[DSMOE_DOMAIN_ENGLISH], 0);
    dsmoe_corpus_free(c);
    dsmoe_corpus_config cc;
    dsmoe_corpus_config_default(&cc);
    cc.tokens = 20000;
    cc.valid_fraction = 0;
    cc.fortunes_dir = tl_tmp("no-fortunes-here");
    ASSERT_OK(dsmoe_corpus_builtin(&cc, &c));
    ASSERT_EQ_INT(dsmoe_corpus_length(c, DSMOE_SPLIT_VALID), 0);
    ASSERT_EQ_INT(dsmoe_corpus_window_count(c, DSMOE_SPLIT_VALID, 8), 0);
    dsmoe_corpus_free(c);
}

static void test_bad_configs(void) {
    dsmoe_corpus_config cc;
    dsmoe_corpus *c = (dsmoe_corpus *)&cc;
    dsmoe_corpus_config_default(&cc);
    cc.fortunes_dir = tl_tmp("no-fortunes-here");
    cc.valid_fraction = 0.7;
    ASSERT_STATUS(dsmoe_corpus_builtin(&cc, &c), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(c == NULL && strstr(dsmoe_last_error(), "valid_fraction"));
    dsmoe_corpus_config_default(&cc);
    cc.fortunes_dir = tl_tmp("no-fortunes-here");
    cc.tokens = 10;
    ASSERT_STATUS(dsmoe_corpus_builtin(&cc, &c), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "tokens") != NULL);
    cc.tokens = 5000;
    cc.domains = 1u << 9;
    ASSERT_STATUS(dsmoe_corpus_builtin(&cc, &c), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "domains") != NULL);
    cc.domains = 1u << DSMOE_DOMAIN_ENGLISH; /* asked for, but no fortune files */
    ASSERT_STATUS(dsmoe_corpus_builtin(&cc, &c), DSMOE_STATUS_INVALID_CONFIG);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "english") != NULL);
    ASSERT_STATUS(dsmoe_corpus_builtin(NULL, &c), DSMOE_STATUS_INVALID_ARGUMENT);
}

/* ------------------------------------------------------------ text files -- */

static const char *write_tmp(const char *name, const char *data, size_t n) {
    static char paths[8][4096];
    static int k;
    char *p = paths[k++ % 8];
    snprintf(p, 4096, "%s", tl_tmp(name));
    FILE *f = fopen(p, "wb");
    fwrite(data, 1, n, f);
    fclose(f);
    return p;
}

typedef struct textdocs {
    int64_t n;
    int64_t max_len;
    char first[64];
} textdocs;

static void text_doc(int s, const char *b, int64_t n, int d, void *ctx) {
    (void)s;
    textdocs *t = (textdocs *)ctx;
    ASSERT_EQ_INT(d, DSMOE_DOMAIN_TEXT);
    if (t->n++ == 0) snprintf(t->first, sizeof t->first, "%s", b);
    if (n > t->max_len) t->max_len = n;
}

static void test_text_files(void) {
    /* paragraphs, one over 4 KiB of short lines, one over 4 KiB without a line end made of
     * 2-byte characters */
    size_t cap = 40000, n = 0;
    char *txt = (char *)malloc(cap);
    n += (size_t)sprintf(txt + n, "First paragraph.\nStill first.\n\n\nSecond one.\n\n");
    for (int i = 0; i < 600; i++) n += (size_t)sprintf(txt + n, "line %d\n", i);
    n += (size_t)sprintf(txt + n, "\n");
    for (int i = 0; i < 3000; i++) {
        txt[n++] = (char)0xc3;
        txt[n++] = (char)0xa9;
    }
    txt[n++] = '\n';
    const char *paths[2] = {write_tmp("corpus_a.txt", txt, n), write_tmp("corpus_b.txt", "Other file.\n", 12)};
    dsmoe_corpus_config cc;
    dsmoe_corpus_config_default(&cc);
    cc.valid_fraction = 0;
    cc.tokens = 0;
    dsmoe_corpus *c = NULL;
    ASSERT_OK(dsmoe_corpus_from_files(paths, 2, &cc, &c));
    if (c) {
        textdocs t = {0};
        each_doc(c, 0, text_doc, &t);
        ASSERT_TRUE(strcmp(t.first, "First paragraph.\nStill first.\n") == 0);
        ASSERT_TRUE(t.max_len <= 4096);
        ASSERT_TRUE(t.n >= 6);
        /* every byte of the files is in some document, in order */
        int64_t bytes = dsmoe_corpus_length(c, DSMOE_SPLIT_TRAIN) - 2 * t.n;
        ASSERT_EQ_INT(bytes, (int64_t)n - 4 + 12); /* the blank lines between paragraphs go */
        dsmoe_corpus_free(c);
    }
    /* refusals name the file and the place */
    const char *bad[1] = {write_tmp("corpus_bad.txt", "ok so far \xc0\xaf overlong", 22)};
    c = (dsmoe_corpus *)&cc;
    ASSERT_STATUS(dsmoe_corpus_from_files(bad, 1, &cc, &c), DSMOE_STATUS_FORMAT);
    ASSERT_TRUE(c == NULL && strstr(dsmoe_last_error(), "corpus_bad.txt") &&
                strstr(dsmoe_last_error(), "byte offset 10"));
    const char *empty[1] = {write_tmp("corpus_empty.txt", "", 0)};
    ASSERT_STATUS(dsmoe_corpus_from_files(empty, 1, &cc, &c), DSMOE_STATUS_FORMAT);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "empty") != NULL);
    const char *missing[1] = {tl_tmp("corpus_missing.txt")};
    ASSERT_STATUS(dsmoe_corpus_from_files(missing, 1, &cc, &c), DSMOE_STATUS_IO);
    ASSERT_TRUE(strstr(dsmoe_last_error(), "corpus_missing.txt") != NULL);
    free(txt);
}

static void test_utf8(void) {
    struct {
        const char *s;
        int64_t bad;
    } cases[] = {{"plain", -1},          {"\xc3\xa9t\xc3\xa9", -1}, {"\xe2\x82\xac", -1},
                 {"\xf0\x9f\x98\x80", -1}, {"a\x80", 1},            {"\xc0\x80", 0},
                 {"\xe0\x80\xaf", 0},     {"\xed\xa0\x80", 0},      {"\xf4\x90\x80\x80", 0},
                 {"ab\xe2\x82", 2},       {"\xf8\x88\x80\x80\x80", 0}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        ASSERT_EQ_INT(dsmoe__utf8_invalid_at((const uint8_t *)cases[i].s, (int64_t)strlen(cases[i].s)),
                      cases[i].bad);
}

/* --------------------------------------------------------------- batches -- */

static void test_sample_and_windows(void) {
    dsmoe_corpus *c = build(9, 1024, 0, NULL);
    if (!c) return;
    const int64_t n = dsmoe_corpus_length(c, DSMOE_SPLIT_TRAIN);
    const uint16_t *tok = dsmoe_corpus_tokens(c, DSMOE_SPLIT_TRAIN);
    const uint8_t *dom = dsmoe_corpus_domains(c, DSMOE_SPLIT_TRAIN);
    const int32_t T = 16, B = 4;
    int32_t t[4 * 17];
    uint8_t d[4 * 17];
    dsmoe_rng r;
    dsmoe_rng_seed(&r, 4);
    /* every window is a slice; over many draws both ends of the split are reached */
    int first = 0, last = 0;
    for (int it = 0; it < 3000; it++) {
        ASSERT_OK(dsmoe_corpus_sample(c, DSMOE_SPLIT_TRAIN, &r, B, T, t, d));
        for (int b = 0; b < B; b++) {
            const int32_t *w = t + b * (T + 1);
            int64_t p = -1;
            for (int64_t s = 0; s + T < n && p < 0; s++) {
                int ok = 1;
                for (int k = 0; k <= T && ok; k++) ok = tok[s + k] == w[k] && dom[s + k] == d[b * (T + 1) + k];
                if (ok) p = s;
            }
            if (p < 0) TL_FAIL("window %d is no slice of the split", b);
            if (p == 0) first = 1;
            if (p + T == n - 1) last = 1;
        }
    }
    ASSERT_TRUE(first && last);
    /* refusals leave the rng alone */
    dsmoe_rng keep = r;
    ASSERT_STATUS(dsmoe_corpus_sample(c, DSMOE_SPLIT_TRAIN, &r, B, (int32_t)n, t, d), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_STATUS(dsmoe_corpus_sample(c, DSMOE_SPLIT_TRAIN, &r, 0, T, t, d), DSMOE_STATUS_INVALID_ARGUMENT);
    ASSERT_TRUE(keep.state == r.state);
    /* windows tile the split: window i starts at i·T, the last is padded */
    int64_t nw = dsmoe_corpus_window_count(c, DSMOE_SPLIT_TRAIN, T);
    ASSERT_EQ_INT(nw, (n - 1 + T - 1) / T);
    int64_t covered = 0;
    for (int64_t i = 0; i < nw; i++) {
        int64_t got = dsmoe_corpus_window(c, DSMOE_SPLIT_TRAIN, T, i, t, d);
        ASSERT_TRUE(got >= 2 && got <= T + 1);
        for (int64_t k = 0; k <= T; k++) {
            if (k < got) {
                if (t[k] != tok[i * T + k]) TL_FAIL("window %lld token %lld", (long long)i, (long long)k);
            } else {
                ASSERT_TRUE(t[k] == DSMOE_BYTE_VOCAB_PAD && d[k] == 255);
            }
        }
        covered += got - 1; /* predicted positions */
    }
    ASSERT_EQ_INT(covered, n - 1);
    ASSERT_EQ_INT(dsmoe_corpus_window(c, DSMOE_SPLIT_TRAIN, T, nw, t, d), -1);
    ASSERT_EQ_INT(dsmoe_corpus_window(c, DSMOE_SPLIT_TRAIN, T, -1, t, d), -1);
    dsmoe_corpus_free(c);
}

int main(void) {
    RUN(test_names);
    RUN(test_utf8);
    RUN(test_deterministic);
    RUN(test_contents);
    RUN(test_prefix_stable);
    RUN(test_domains_mask);
    RUN(test_bad_configs);
    RUN(test_text_files);
    RUN(test_sample_and_windows);
    return TEST_SUMMARY();
}
