/*
 * files.c — a Hugging Face model directory: model.safetensors, or the shards listed
 * by model.safetensors.index.json, checked tensor by tensor against the table of the
 * configuration (tensors.c), and widened to fp32 on request (F32, BF16, F16, and
 * F8_E4M3 with 128x128 block scales as DeepSeek-V3 stores them, SPEC-model §7).
 *
 * F8_E4M3. The safetensors reader of the io layer knows no 8-bit float dtype. A shard
 * whose header names F8_E4M3 is therefore mapped privately here, and in the mapped
 * header each `"F8_E4M3"` dtype value (found by walking the header with the JSON
 * reader) is overwritten by `"U8"` and five spaces — the same element size, still
 * valid JSON — before the reader validates the image in place
 * (dsmoe_safetensors_open_memory). Only the header's pages are made writable, so
 * only they are copied; the data stay mapped from the file. The names of the
 * rewritten tensors are kept, so a U8 tensor is F8 only if the header said so. When
 * the io layer learns F8_E4M3 this detour can go.
 */
#include "io/json.h"
#include "model/model_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MF_MAX_HEADER ((uint64_t)100 * 1024 * 1024)
#define MF_MAX_INDEX ((size_t)64 << 20)
#define MF_MAX_SHARDS 65536

/* ------------------------------------------------------------ fp8 e4m3 -- */

float dsmoe_fp8_e4m3_to_f32(uint8_t b) {
    int sign = b >> 7, e = (b >> 3) & 0xF, m = b & 7;
    float v;
    if (e == 0xF && m == 7) return NAN; /* 0x7F, 0xFF: the only NaNs; no infinities */
    if (e == 0) v = ldexpf((float)m, -9);                 /* subnormal: m/8 · 2^-6 */
    else v = ldexpf((float)(8 + m), e - 10);              /* (1 + m/8) · 2^(e-7) */
    return sign ? -v : v;
}

int64_t dsmoe__fp8_dequant(float *dst, const uint8_t *w, int64_t rows, int64_t cols,
                           const void *scale_inv, int32_t br, int32_t bc) {
    float lut[256];
    for (int i = 0; i < 256; i++) lut[i] = dsmoe_fp8_e4m3_to_f32((uint8_t)i);
    const int64_t nbc = (cols + bc - 1) / bc;
    const unsigned char *sc = (const unsigned char *)scale_inv;
    int64_t bad = -1;
    for (int64_t i = 0; i < rows; i++) {
        const unsigned char *srow = sc + (size_t)(i / br) * (size_t)nbc * 4;
        for (int64_t jb = 0; jb < nbc; jb++) {
            float s;
            memcpy(&s, srow + (size_t)jb * 4, 4);
            int64_t j1 = (jb + 1) * bc < cols ? (jb + 1) * bc : cols;
            for (int64_t j = jb * bc; j < j1; j++) {
                float x = lut[w[i * cols + j]] * s;
                dst[i * cols + j] = x;
                if (bad < 0 && !isfinite(x)) bad = i * cols + j;
            }
        }
    }
    return bad;
}

/* ------------------------------------------------------------ the object -- */

typedef struct mf_shard {
    char *file;               /* file name inside the directory */
    char *path;               /* directory + file */
    dsmoe_safetensors *st;
    void *image;              /* private image (F8 shards only): mapped or malloc()ed */
    size_t image_size;
    int image_mapped;
    char **f8_names;          /* tensors whose dtype was F8_E4M3, sorted */
    int64_t n_f8;
} mf_shard;

typedef struct mf_entry {
    dsmoe_model_tensor_spec spec;
    int32_t shard;            /* -1: not found */
    dsmoe_tensor_view view;
    int32_t f8;
    int32_t scale_shard;      /* -1: no _scale_inv */
    dsmoe_tensor_view scale;
} mf_entry;

struct dsmoe_model_files {
    dsmoe_model_config cfg;
    mf_shard *shards;
    int32_t n_shards;
    mf_entry *entries;        /* the table with every MTP depth, sorted by name */
    int64_t n_entries;
    int32_t mtp_depths;
};

static int cmp_entry(const void *a, const void *b) {
    return strcmp(((const mf_entry *)a)->spec.name, ((const mf_entry *)b)->spec.name);
}

/* bsearch comparator: a name against an entry. */
static int cmp_name_entry(const void *name, const void *e) {
    return strcmp((const char *)name, ((const mf_entry *)e)->spec.name);
}

static mf_entry *mf_find(const dsmoe_model_files *mf, const char *name) {
    return (mf_entry *)bsearch(name, mf->entries, (size_t)mf->n_entries, sizeof *mf->entries,
                               cmp_name_entry);
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void shard_release(mf_shard *sh) {
    dsmoe_safetensors_close(sh->st);
    sh->st = NULL;
    if (sh->image) {
        if (sh->image_mapped) munmap(sh->image, sh->image_size);
        else free(sh->image);
    }
    sh->image = NULL;
    for (int64_t i = 0; i < sh->n_f8; i++) free(sh->f8_names[i]);
    free(sh->f8_names);
    free(sh->file);
    free(sh->path);
    memset(sh, 0, sizeof *sh);
}

void dsmoe_model_files_close(dsmoe_model_files *mf) {
    if (!mf) return;
    for (int32_t i = 0; i < mf->n_shards; i++) shard_release(&mf->shards[i]);
    free(mf->shards);
    free(mf->entries);
    free(mf);
}

static char *join(const char *dir, const char *file) {
    size_t n = strlen(dir) + strlen(file) + 2;
    char *p = (char *)malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, file);
    return p;
}

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = (char *)malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

/* Re-issues the last error with the file path in front. */
static dsmoe_status with_path(dsmoe_status s, const char *path) {
    char msg[768];
    snprintf(msg, sizeof msg, "%s", dsmoe_last_error());
    return dsmoe__error(s, "%s: %s", path, msg);
}

/* ------------------------------------------------------------ F8 shards -- */

/* Rewrites each "F8_E4M3" dtype value of the header hdr[0..n) (file offset 8) into
 * "U8" + 5 spaces and records the tensor names. A header the JSON walk does not
 * understand is left alone: the reader then reports it. */
static dsmoe_status f8_patch_header(mf_shard *sh, unsigned char *hdr, size_t n) {
    char *arena = (char *)malloc(n + 1);
    if (!arena) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s: header arena", sh->path);
    dsmoe__json j;
    dsmoe__json_init(&j, hdr, n, 8, "safetensors header", arena, n + 1);
    int64_t cap = 0;
    /* Any JSON error ends the walk (the reader reports it); only running out of memory
     * is an error here. */
    int ok = dsmoe__json_begin(&j, '{', "the header") == DSMOE_OK;
    while (ok) {
        int more = 0;
        const char *tname = "", *key = "";
        size_t len, at;
        if (dsmoe__json_next_member(&j, &more, &tname, &len, &at) != DSMOE_OK || !more) break;
        if (strcmp(tname, "__metadata__") == 0 || dsmoe__json_peek(&j) != DSMOE__JSON_OBJECT) {
            ok = dsmoe__model_json_skip(&j, tname) == DSMOE_OK;
            continue;
        }
        if (dsmoe__json_begin(&j, '{', tname) != DSMOE_OK) break;
        for (;;) {
            ok = dsmoe__json_next_member(&j, &more, &key, &len, &at) == DSMOE_OK;
            if (!ok || !more) break;
            if (strcmp(key, "dtype") != 0 || dsmoe__json_peek(&j) != DSMOE__JSON_STRING) {
                if (!(ok = dsmoe__model_json_skip(&j, key) == DSMOE_OK)) break;
                continue;
            }
            size_t v0 = j.pos;
            const char *dt = "";
            if (!(ok = dsmoe__json_string(&j, &dt, &len) == DSMOE_OK)) break;
            if (strcmp(dt, "F8_E4M3") != 0 || j.pos - v0 != 9) continue;
            static const unsigned char u8_value[9] = {'"', 'U', '8', '"', ' ', ' ', ' ', ' ', ' '};
            for (size_t b = 0; b < sizeof u8_value; b++) hdr[v0 + b] = u8_value[b];
            if (sh->n_f8 == cap) {
                int64_t nc = cap ? 2 * cap : 64;
                char **g = (char **)realloc(sh->f8_names, (size_t)nc * sizeof *g);
                if (!g) {
                    free(arena);
                    return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s: F8 names", sh->path);
                }
                sh->f8_names = g;
                cap = nc;
            }
            if (!(sh->f8_names[sh->n_f8] = dup_str(tname))) {
                free(arena);
                return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s: F8 names", sh->path);
            }
            sh->n_f8++;
        }
    }
    free(arena);
    dsmoe_clear_error(); /* a malformed header is reported by the reader */
    if (sh->n_f8 > 1) qsort(sh->f8_names, (size_t)sh->n_f8, sizeof *sh->f8_names, cmp_str);
    return DSMOE_OK;
}

static int memfind(const unsigned char *h, size_t n, const char *needle) {
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (h[i] == (unsigned char)needle[0] && memcmp(h + i, needle, k) == 0) return 1;
    return 0;
}

/* Opens one shard: through the io reader, or (when its header names F8_E4M3) as a
 * private image with the header rewritten. */
static dsmoe_status shard_open(mf_shard *sh) {
    int fd = open(sh->path, O_RDONLY);
    if (fd < 0) return dsmoe__error(DSMOE_STATUS_IO, "%s: %s", sh->path, strerror(errno));
    struct stat stt;
    unsigned char head8[8];
    uint64_t hn = 0;
    int f8 = 0;
    if (fstat(fd, &stt) == 0 && stt.st_size >= 8 && pread(fd, head8, 8, 0) == 8) {
        memcpy(&hn, head8, 8);
        if (hn <= MF_MAX_HEADER && hn <= (uint64_t)stt.st_size - 8) {
            unsigned char *h = (unsigned char *)malloc(hn ? hn : 1);
            if (h && pread(fd, h, hn, 8) == (ssize_t)hn) f8 = memfind(h, hn, "F8_E4M3");
            free(h);
        }
    }
    if (!f8) {
        close(fd);
        dsmoe_status s = dsmoe_safetensors_open(sh->path, &sh->st);
        return s;
    }
    size_t size = (size_t)stt.st_size;
    void *img = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t hdr_end = 8 + (size_t)hn;
    size_t wlen = (hdr_end + page - 1) / page * page;
    if (wlen > size) wlen = size;
    if (img != MAP_FAILED && mprotect(img, wlen, PROT_READ | PROT_WRITE) == 0) {
        sh->image = img;
        sh->image_mapped = 1;
    } else {
        if (img != MAP_FAILED) munmap(img, size);
        /* No private mapping (e.g. a file system without mmap): read the file. */
        unsigned char *buf = (unsigned char *)malloc(size);
        if (!buf) {
            close(fd);
            return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s: %zu bytes", sh->path, size);
        }
        size_t got = 0;
        while (got < size) {
            ssize_t r = pread(fd, buf + got, size - got, (off_t)got);
            if (r <= 0) {
                int e = errno;
                free(buf);
                close(fd);
                return dsmoe__error(DSMOE_STATUS_IO, "%s: read: %s", sh->path,
                                    r == 0 ? "unexpected end of file" : strerror(e));
            }
            got += (size_t)r;
        }
        sh->image = buf;
        sh->image_mapped = 0;
    }
    close(fd);
    sh->image_size = size;
    unsigned char *base = (unsigned char *)sh->image;
    dsmoe_status s = f8_patch_header(sh, base + 8, (size_t)hn);
    if (sh->image_mapped) mprotect(sh->image, wlen, PROT_READ);
    if (s != DSMOE_OK) return s;
    if ((s = dsmoe_safetensors_open_memory(sh->image, size, &sh->st)) != DSMOE_OK)
        return with_path(s, sh->path);
    return DSMOE_OK;
}

static int shard_is_f8(const mf_shard *sh, const char *name) {
    return sh->n_f8 > 0 &&
           bsearch(&name, sh->f8_names, (size_t)sh->n_f8, sizeof *sh->f8_names, cmp_str) != NULL;
}

/* ------------------------------------------------------------ the index -- */

typedef struct wm_entry {
    const char *name;  /* in the arena */
    int32_t shard;
    int32_t used;
} wm_entry;

static int cmp_wm(const void *a, const void *b) {
    return strcmp(((const wm_entry *)a)->name, ((const wm_entry *)b)->name);
}

/* Reads model.safetensors.index.json: the distinct shard files (in order of first
 * appearance) into mf->shards and the sorted weight_map into *wm. */
static dsmoe_status read_index(dsmoe_model_files *mf, const char *dir, const char *path,
                               char **text_out, char **arena_out, wm_entry **wm_out,
                               int64_t *n_wm_out) {
    FILE *f = fopen(path, "rb");
    if (!f) return dsmoe__error(DSMOE_STATUS_IO, "%s: %s", path, strerror(errno));
    char *text = (char *)malloc(MF_MAX_INDEX + 1);
    size_t len = text ? fread(text, 1, MF_MAX_INDEX + 1, f) : 0;
    int rerr = ferror(f);
    fclose(f);
    *text_out = text;
    if (!text) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s", path);
    if (rerr) return dsmoe__error(DSMOE_STATUS_IO, "%s: read error", path);
    if (len > MF_MAX_INDEX) return dsmoe__error(DSMOE_STATUS_FORMAT, "%s: larger than 64 MiB", path);
    char *arena = (char *)malloc(len + 1);
    *arena_out = arena;
    if (!arena) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s", path);
    dsmoe__json j;
    dsmoe__json_init(&j, text, len, 0, path, arena, len + 1);
    wm_entry *wm = NULL;
    int64_t n_wm = 0, cap_wm = 0;
    int32_t cap_sh = 0;
    int have_map = 0;
    dsmoe_status s = dsmoe__json_begin(&j, '{', "the index");
    while (s == DSMOE_OK) {
        int more;
        const char *key;
        size_t klen, at;
        if ((s = dsmoe__json_next_member(&j, &more, &key, &klen, &at)) != DSMOE_OK || !more) break;
        if (strcmp(key, "weight_map") != 0) {
            s = dsmoe__model_json_skip(&j, key);
            continue;
        }
        if (have_map) {
            s = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: weight_map is given twice", path);
            break;
        }
        have_map = 1;
        if ((s = dsmoe__json_begin(&j, '{', "weight_map")) != DSMOE_OK) break;
        for (;;) {
            const char *tname, *file;
            size_t flen;
            if ((s = dsmoe__json_next_member(&j, &more, &tname, &klen, &at)) != DSMOE_OK || !more)
                break;
            size_t vat = dsmoe__json_offset(&j);
            if (dsmoe__json_peek(&j) != DSMOE__JSON_STRING) {
                s = dsmoe__json_fail(&j, vat - j.base, "weight_map: the file of %s must be a string",
                                     tname);
                break;
            }
            if ((s = dsmoe__json_string(&j, &file, &flen)) != DSMOE_OK) break;
            if (flen == 0 || strchr(file, '/') || strcmp(file, ".") == 0 || strcmp(file, "..") == 0) {
                s = dsmoe__error(DSMOE_STATUS_FORMAT,
                                 "%s: weight_map: %s is in \"%s\", which is not a file name in "
                                 "the model directory", path, tname, file);
                break;
            }
            int32_t sh = -1;
            for (int32_t i = mf->n_shards - 1; i >= 0 && sh < 0; i--)
                if (strcmp(mf->shards[i].file, file) == 0) sh = i;
            if (sh < 0) {
                if (mf->n_shards == MF_MAX_SHARDS) {
                    s = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: more than %d shard files", path,
                                     MF_MAX_SHARDS);
                    break;
                }
                if (mf->n_shards == cap_sh) {
                    int32_t nc = cap_sh ? 2 * cap_sh : 16;
                    mf_shard *g = (mf_shard *)realloc(mf->shards, (size_t)nc * sizeof *g);
                    if (!g) {
                        s = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s: shards", path);
                        break;
                    }
                    mf->shards = g;
                    cap_sh = nc;
                }
                mf_shard *n = &mf->shards[mf->n_shards];
                memset(n, 0, sizeof *n);
                mf->n_shards++;
                n->file = dup_str(file);
                n->path = join(dir, file);
                if (!n->file || !n->path) {
                    s = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s: shards", path);
                    break;
                }
                sh = mf->n_shards - 1;
            }
            if (n_wm == cap_wm) {
                int64_t nc = cap_wm ? 2 * cap_wm : 1024;
                wm_entry *g = (wm_entry *)realloc(wm, (size_t)nc * sizeof *g);
                if (!g) {
                    s = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "%s: weight_map", path);
                    break;
                }
                wm = g;
                cap_wm = nc;
            }
            wm[n_wm].name = tname;
            wm[n_wm].shard = sh;
            wm[n_wm].used = 0;
            n_wm++;
        }
    }
    if (s == DSMOE_OK) s = dsmoe__json_finish(&j);
    if (s == DSMOE_OK && !have_map)
        s = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: no weight_map object", path);
    if (s == DSMOE_OK && n_wm > 1) {
        qsort(wm, (size_t)n_wm, sizeof *wm, cmp_wm);
        for (int64_t i = 1; i < n_wm; i++)
            if (strcmp(wm[i - 1].name, wm[i].name) == 0) {
                s = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: weight_map lists %s twice", path,
                                 wm[i].name);
                break;
            }
    }
    *wm_out = wm;
    *n_wm_out = n_wm;
    return s;
}

/* ------------------------------------------------------------ checking -- */

static void shape_str(char *buf, size_t cap, int32_t ndim, const int64_t *shape) {
    size_t used = (size_t)snprintf(buf, cap, "(");
    for (int32_t d = 0; d < ndim && used < cap; d++)
        used += (size_t)snprintf(buf + used, cap - used, d ? ", %lld" : "%lld", (long long)shape[d]);
    if (used < cap) snprintf(buf + used, cap - used, ndim == 1 ? ",)" : ")");
}

static const char *const scale_suffix = "_scale_inv";

/* Places one tensor of a shard into the table (or reports why it does not fit). */
static dsmoe_status place(dsmoe_model_files *mf, int32_t shi, const dsmoe_tensor_view *v) {
    const mf_shard *sh = &mf->shards[shi];
    size_t n = strlen(v->name), ns = strlen(scale_suffix);
    int is_scale = n > ns && strcmp(v->name + n - ns, scale_suffix) == 0;
    char base[DSMOE_MODEL_NAME_MAX];
    const char *look = v->name;
    if (is_scale) {
        if (n - ns >= sizeof base) look = NULL;
        else {
            memcpy(base, v->name, n - ns);
            base[n - ns] = '\0';
            look = base;
        }
    }
    mf_entry *e = look ? mf_find(mf, look) : NULL;
    if (!e)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "%s: tensor %s is not part of the model that config.json describes",
                            sh->path, v->name);
    int32_t *slot = is_scale ? &e->scale_shard : &e->shard;
    if (*slot >= 0)
        return dsmoe__error(DSMOE_STATUS_FORMAT, "tensor %s is in both %s and %s", v->name,
                            mf->shards[*slot].file, sh->file);
    *slot = shi;
    if (is_scale) e->scale = *v;
    else {
        e->view = *v;
        e->f8 = v->dtype == DSMOE_DTYPE_U8 && shard_is_f8(sh, v->name);
    }
    return DSMOE_OK;
}

/* Checks one placed tensor: shape, dtype, scales. */
static dsmoe_status check_entry(const dsmoe_model_files *mf, const mf_entry *e) {
    char want[64], got[64];
    const char *file = mf->shards[e->shard].path;
    shape_str(want, sizeof want, e->spec.ndim, e->spec.shape);
    shape_str(got, sizeof got, e->view.ndim, e->view.shape);
    if (e->view.ndim != e->spec.ndim || e->view.shape[0] != e->spec.shape[0] ||
        (e->spec.ndim == 2 && e->view.shape[1] != e->spec.shape[1]))
        return dsmoe__error(DSMOE_STATUS_SHAPE_MISMATCH, "%s: tensor %s has shape %s, want %s",
                            file, e->spec.name, got, want);
    int ok = e->view.dtype == DSMOE_DTYPE_F32 || e->view.dtype == DSMOE_DTYPE_BF16 ||
             e->view.dtype == DSMOE_DTYPE_F16 || e->f8;
    if (!ok)
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "%s: tensor %s has dtype %s; weights must be F32, BF16, F16 or "
                            "F8_E4M3", file, e->spec.name, dsmoe_dtype_name(e->view.dtype));
    if (e->f8) {
        const dsmoe_model_config *c = &mf->cfg;
        if (e->spec.ndim != 2)
            return dsmoe__error(DSMOE_STATUS_FORMAT,
                                "%s: tensor %s is F8_E4M3; only matrices may be", file, e->spec.name);
        if (c->fp8_block_rows == 0)
            return dsmoe__error(DSMOE_STATUS_FORMAT,
                                "%s: tensor %s is F8_E4M3 but config.json has no "
                                "quantization_config (weight_block_size)", file, e->spec.name);
        if (e->scale_shard < 0)
            return dsmoe__error(DSMOE_STATUS_NOT_FOUND, "tensor %s%s is missing (the block scales "
                                "of the F8_E4M3 tensor %s in %s)", e->spec.name, scale_suffix,
                                e->spec.name, mf->shards[e->shard].file);
        int64_t sh[2] = {(e->spec.shape[0] + c->fp8_block_rows - 1) / c->fp8_block_rows,
                         (e->spec.shape[1] + c->fp8_block_cols - 1) / c->fp8_block_cols};
        const char *sfile = mf->shards[e->scale_shard].path;
        shape_str(want, sizeof want, 2, sh);
        shape_str(got, sizeof got, e->scale.ndim, e->scale.shape);
        if (e->scale.ndim != 2 || e->scale.shape[0] != sh[0] || e->scale.shape[1] != sh[1])
            return dsmoe__error(DSMOE_STATUS_SHAPE_MISMATCH,
                                "%s: tensor %s%s has shape %s, want %s (blocks of %dx%d)", sfile,
                                e->spec.name, scale_suffix, got, want, (int)c->fp8_block_rows,
                                (int)c->fp8_block_cols);
        if (e->scale.dtype != DSMOE_DTYPE_F32)
            return dsmoe__error(DSMOE_STATUS_FORMAT, "%s: tensor %s%s has dtype %s, want F32", sfile,
                                e->spec.name, scale_suffix, dsmoe_dtype_name(e->scale.dtype));
    } else if (e->scale_shard >= 0) {
        return dsmoe__error(DSMOE_STATUS_FORMAT,
                            "%s: tensor %s%s belongs to %s, which is %s, not F8_E4M3",
                            mf->shards[e->scale_shard].path, e->spec.name, scale_suffix,
                            e->spec.name, dsmoe_dtype_name(e->view.dtype));
    }
    return DSMOE_OK;
}

/* Everything after the shards are known: open, place, cross-check, check. */
static dsmoe_status mf_check(dsmoe_model_files *mf, wm_entry *wm, int64_t n_wm,
                             const char *index_path) {
    dsmoe_status s;
    for (int32_t i = 0; i < mf->n_shards; i++)
        if ((s = shard_open(&mf->shards[i])) != DSMOE_OK) return s;
    for (int32_t i = 0; i < mf->n_shards; i++) {
        const mf_shard *sh = &mf->shards[i];
        int64_t n = dsmoe_safetensors_count(sh->st);
        for (int64_t k = 0; k < n; k++) {
            dsmoe_tensor_view v;
            if ((s = dsmoe_safetensors_at(sh->st, k, &v)) != DSMOE_OK) return s;
            if (wm) {
                wm_entry key = {v.name, 0, 0};
                wm_entry *w = (wm_entry *)bsearch(&key, wm, (size_t)n_wm, sizeof *wm, cmp_wm);
                if (!w || w->shard != i)
                    return dsmoe__error(DSMOE_STATUS_FORMAT,
                                        "%s: tensor %s is in this shard but %s lists it %s%s",
                                        sh->path, v.name, index_path,
                                        w ? "in " : "nowhere", w ? mf->shards[w->shard].file : "");
                w->used = 1;
            }
            if ((s = place(mf, i, &v)) != DSMOE_OK) return s;
        }
    }
    for (int64_t k = 0; k < n_wm; k++)
        if (!wm[k].used)
            return dsmoe__error(DSMOE_STATUS_FORMAT, "%s: weight_map puts %s in %s, which has no "
                                "such tensor", index_path, wm[k].name, mf->shards[wm[k].shard].file);

    /* Main tensors: all required. MTP depths: all or nothing, in order. */
    const dsmoe_model_config *c = &mf->cfg;
    const int32_t L = c->num_hidden_layers, depths = c->num_nextn_predict_layers;
    int64_t total[DSMOE__MODEL_MAX_MTP + 1] = {0}, found[DSMOE__MODEL_MAX_MTP + 1] = {0};
    const mf_entry *first_missing[DSMOE__MODEL_MAX_MTP + 1] = {NULL};
    for (int64_t k = 0; k < mf->n_entries; k++) {
        const mf_entry *e = &mf->entries[k];
        int d = e->spec.mtp ? e->spec.layer - L + 1 : 0;
        total[d]++;
        if (e->shard >= 0) found[d]++;
        else if (!first_missing[d] || strcmp(e->spec.name, first_missing[d]->spec.name) < 0)
            first_missing[d] = e;
    }
    if (first_missing[0])
        return dsmoe__error(DSMOE_STATUS_NOT_FOUND, "tensor %s is missing from the model files",
                            first_missing[0]->spec.name);
    mf->mtp_depths = 0;
    for (int d = 1; d <= depths; d++) {
        if (found[d] == 0) continue; /* depth not stored */
        if (found[d] < total[d])
            return dsmoe__error(DSMOE_STATUS_NOT_FOUND,
                                "tensor %s is missing (MTP layer %d is only partly stored)",
                                first_missing[d]->spec.name, (int)(L + d - 1));
        if (mf->mtp_depths != d - 1)
            return dsmoe__error(DSMOE_STATUS_FORMAT,
                                "MTP layer %d (model.layers.%d.*) is stored but MTP layer %d is not",
                                (int)(L + d - 1), (int)(L + d - 1), (int)(L + mf->mtp_depths));
        mf->mtp_depths = d;
    }
    for (int64_t k = 0; k < mf->n_entries; k++)
        if (mf->entries[k].shard >= 0 && (s = check_entry(mf, &mf->entries[k])) != DSMOE_OK)
            return s;
    return DSMOE_OK;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

dsmoe_status dsmoe_model_files_open(const char *dir, const dsmoe_model_config *cfg,
                                    dsmoe_model_files **out) {
    if (out) *out = NULL;
    if (!dir || !cfg || !out)
        return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_files_open: NULL argument");
    dsmoe_status s = dsmoe_model_config_validate(cfg);
    if (s != DSMOE_OK) return s;
    dsmoe_model_files *mf = (dsmoe_model_files *)calloc(1, sizeof *mf);
    if (!mf) return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "model files");
    mf->cfg = *cfg;

    /* The table with every MTP depth, sorted by name for lookups. */
    int64_t n = dsmoe_model_tensor_count(cfg, cfg->num_nextn_predict_layers);
    mf->entries = (mf_entry *)calloc((size_t)(n > 0 ? n : 1), sizeof *mf->entries);
    if (!mf->entries) {
        dsmoe_model_files_close(mf);
        return dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "model files: %lld tensors", (long long)n);
    }
    for (int64_t i = 0; i < n; i++) {
        mf_entry *e = &mf->entries[i];
        (void)dsmoe_model_tensor_at(cfg, cfg->num_nextn_predict_layers, i, &e->spec);
        e->shard = e->scale_shard = -1;
    }
    mf->n_entries = n;
    qsort(mf->entries, (size_t)n, sizeof *mf->entries, cmp_entry);

    char *single = join(dir, "model.safetensors");
    char *index = join(dir, "model.safetensors.index.json");
    char *text = NULL, *arena = NULL;
    wm_entry *wm = NULL;
    int64_t n_wm = 0;
    if (!single || !index) {
        s = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "model files: paths");
    } else if (file_exists(single) && file_exists(index)) {
        s = dsmoe__error(DSMOE_STATUS_FORMAT,
                         "%s and %s are both present; keep one (the single file or the shards)",
                         single, index);
    } else if (file_exists(index)) {
        s = read_index(mf, dir, index, &text, &arena, &wm, &n_wm);
        if (s == DSMOE_OK && mf->n_shards == 0)
            s = dsmoe__error(DSMOE_STATUS_FORMAT, "%s: weight_map is empty", index);
    } else if (!file_exists(single)) {
        s = dsmoe__error(DSMOE_STATUS_IO, "%s: neither model.safetensors nor "
                         "model.safetensors.index.json is there", dir);
    } else {
        mf->shards = (mf_shard *)calloc(1, sizeof *mf->shards);
        if (!mf->shards || !(mf->shards[0].file = dup_str("model.safetensors"))) {
            s = dsmoe__error(DSMOE_STATUS_OUT_OF_MEMORY, "model files");
        } else {
            mf->n_shards = 1;
            mf->shards[0].path = single;
            single = NULL;
        }
    }
    if (s == DSMOE_OK) s = mf_check(mf, wm, n_wm, index);
    free(single);
    free(index);
    free(text);
    free(arena);
    free(wm);
    if (s != DSMOE_OK) {
        dsmoe_model_files_close(mf);
        return s;
    }
    *out = mf;
    return DSMOE_OK;
}

int32_t dsmoe_model_files_mtp_depths(const dsmoe_model_files *mf) { return mf ? mf->mtp_depths : 0; }

int32_t dsmoe_model_files_shard_count(const dsmoe_model_files *mf) { return mf ? mf->n_shards : 0; }

static const mf_entry *lookup(const dsmoe_model_files *mf, const char *name, dsmoe_status *s) {
    if (!mf || !name) {
        *s = dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "model files: NULL argument");
        return NULL;
    }
    const mf_entry *e = mf_find(mf, name);
    if (!e || e->shard < 0) {
        *s = dsmoe__error(DSMOE_STATUS_NOT_FOUND, "tensor %s is not in the model files", name);
        return NULL;
    }
    *s = DSMOE_OK;
    return e;
}

dsmoe_status dsmoe_model_files_get(const dsmoe_model_files *mf, const char *name,
                                   dsmoe_model_tensor_info *out) {
    dsmoe_status s;
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "dsmoe_model_files_get: NULL out");
    const mf_entry *e = lookup(mf, name, &s);
    if (!e) return s;
    memset(out, 0, sizeof *out);
    out->name = e->spec.name;
    out->stored_dtype = e->f8 ? "F8_E4M3" : dsmoe_dtype_name(e->view.dtype);
    out->ndim = e->spec.ndim;
    out->shape[0] = e->spec.shape[0];
    out->shape[1] = e->spec.shape[1];
    out->shard = e->shard;
    out->has_scale = e->f8;
    return DSMOE_OK;
}

dsmoe_status dsmoe_model_files_read_f32(const dsmoe_model_files *mf, const char *name, float *dst) {
    dsmoe_status s;
    const mf_entry *e = lookup(mf, name, &s);
    if (!e) return s;
    if (!dst) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "read %s: NULL dst", name);
    const int64_t rows = e->spec.shape[0], cols = e->spec.ndim == 2 ? e->spec.shape[1] : 1;
    int64_t bad = -1;
    if (e->f8) {
        bad = dsmoe__fp8_dequant(dst, (const uint8_t *)e->view.data, rows, cols, e->scale.data,
                                 mf->cfg.fp8_block_rows, mf->cfg.fp8_block_cols);
    } else {
        if ((s = dsmoe_tensor_to_f32(&e->view, dst)) != DSMOE_OK) return with_path(s, name);
        for (int64_t i = 0; i < rows * cols && bad < 0; i++)
            if (!isfinite(dst[i])) bad = i;
    }
    if (bad >= 0)
        return dsmoe__error(DSMOE_STATUS_NON_FINITE, "tensor %s: element %lld (row %lld, column "
                            "%lld) is %g", e->spec.name, (long long)bad, (long long)(bad / cols),
                            (long long)(bad % cols), (double)dst[bad]);
    return DSMOE_OK;
}

dsmoe_status dsmoe__model_files_view(const dsmoe_model_files *mf, const char *name,
                                     dsmoe__wmat *out) {
    dsmoe_status s;
    const mf_entry *e = lookup(mf, name, &s);
    if (!e) return s;
    if (!out) return dsmoe__error(DSMOE_STATUS_INVALID_ARGUMENT, "view %s: NULL out", name);
    memset(out, 0, sizeof *out);
    out->data = e->view.data;
    out->rows = e->spec.shape[0];
    out->cols = e->spec.ndim == 2 ? e->spec.shape[1] : 1;
    if (e->f8) {
        out->type = DSMOE__WT_F8E4M3;
        out->scale = e->scale.data;
        out->br = mf->cfg.fp8_block_rows;
        out->bc = mf->cfg.fp8_block_cols;
    } else if (e->view.dtype == DSMOE_DTYPE_BF16) {
        out->type = DSMOE__WT_BF16;
    } else if (e->view.dtype == DSMOE_DTYPE_F16) {
        out->type = DSMOE__WT_F16;
    } else {
        out->type = DSMOE__WT_F32; /* the only other dtype open lets through */
    }
    return DSMOE_OK;
}
