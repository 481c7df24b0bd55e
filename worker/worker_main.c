/* worker_main.c — `duet-worker`: the headless per-GPU process of a duet cluster.
 *
 *   duet-worker --rank R --world-size N --model DIR --auth-token-file F
 *               [--listen 127.0.0.1:7100] [--backend cpu] [--peers H:P,H:P,...]
 *               [--threads T] [--max-seqs S] [--max-seq-len L] [--hello-timeout-ms MS]
 *               [--comm-timeout-ms MS] [--kv-memory-mb N] [--kv-dtype f32|bf16|fp8]
 *               [--device-sampling auto|on|off]
 *
 * Why: worker-first launch — workers start, validate their checkpoint, listen and wait; the
 * coordinator connects to each later. Before listening the worker reads the checkpoint's headers
 * only (config.json + safetensors index, memory-mapped) to know its model fingerprint, so a
 * coordinator with the wrong model is refused at Hello, before any weight is loaded; an
 * invalid checkpoint stops the worker here with the loader's sentence. This file only parses
 * flags and checks them; it must never bind a non-loopback address unless --listen names
 * one, and never print the token.
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/ckpt.h"
#include "common/config.h"
#include "common/err.h"
#include "common/rpc.h"
#include "common/safetensors.h"
#include "worker/model.h"
#include "worker/rpcsrv.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: duet-worker --rank R --world-size N --model DIR --auth-token-file FILE\n"
            "                   [--listen HOST:PORT] [--backend cpu|cuda] [--peers H:P,H:P,...]\n"
            "                   [--device N] [--gpu-memory-utilization F (0.9)]\n"
            "                   [--threads T] [--max-seqs S] [--max-seq-len L]\n"
            "                   [--hello-timeout-ms MS] [--comm-timeout-ms MS]\n"
            "                   [--kv-memory-mb N (1024; cuda: also what the device has left)]\n"
            "                   [--kv-dtype f32|bf16|fp8 (f32; bf16: rings, entries, keys in half the\n"
            "                    bytes; fp8: rings and entries as 584-byte FP8 rows, keys bf16)]\n"
            "                   [--device-sampling auto|on|off (auto: on for cuda, off for cpu;\n"
            "                    on: rank 0 draws rows without logit_bias, masks or penalties\n"
            "                    with the backend's sample op, next to the logits)]\n"
            "Listens (default 127.0.0.1:7100; port 0 picks a free port) and waits for one\n"
            "authenticated coordinator. --peers lists the data-plane address of every rank\n"
            "(required when N > 1). The token file must be mode 0600 and hold >= 16 bytes.\n");
}

/* Parses a non-negative decimal int flag. */
static int int_flag(const char *name, const char *v, int lo, int hi, int *out) {
    char *end;
    long x = strtol(v, &end, 10);
    if (!*v || *end || x < lo || x > hi) {
        fprintf(stderr, "duet-worker: --%s '%s' must be an integer in [%d, %d]\n", name, v, lo,
                hi);
        return -1;
    }
    *out = (int)x;
    return 0;
}

/* Parses --kv-dtype: f32, bf16 or fp8 (dv4_kv_dtype). */
static int kv_dtype_flag(const char *v, int *out) {
    char err[200];
    dv4_kv_dtype dt;
    if (dv4_kv_dtype_parse(v, &dt, err, sizeof err)) {
        fprintf(stderr, "duet-worker: --kv-dtype: %s\n", err);
        return -1;
    }
    *out = (int)dt;
    return 0;
}

/* Parses --device-sampling: auto (-1), on (1) or off (0). */
static int device_sampling_flag(const char *v, int *out) {
    *out = !strcmp(v, "auto") ? -1 : !strcmp(v, "on") ? 1 : !strcmp(v, "off") ? 0 : -2;
    if (*out != -2) return 0;
    fprintf(stderr, "duet-worker: --device-sampling '%s' must be auto, on or off\n", v);
    return -1;
}

/* Splits "a,b,c" into a NULL-terminated array of n strings (one allocation each). */
static char **split_peers(const char *s, int *n) {
    int cap = 1;
    for (const char *p = s; *p; p++) cap += *p == ',';
    char **v = xcalloc((size_t)cap + 1, sizeof *v);
    *n = 0;
    const char *p = s;
    for (;;) {
        size_t l = strcspn(p, ",");
        v[*n] = xmalloc(l + 1);
        memcpy(v[*n], p, l);
        v[*n][l] = 0;
        (*n)++;
        if (!p[l]) break;
        p += l + 1;
    }
    return v;
}

static void free_peers(char **v) {
    if (!v) return;
    for (char **p = v; *p; p++) free(*p);
    free(v);
}

/* Reads the checkpoint's headers (no weights) and returns its fingerprint; validates every
 * tensor against the config so a broken checkpoint stops the worker before it listens. */
static int checkpoint_identity(const char *dir, uint64_t *fp, uint64_t *bytes, char *err,
                               size_t errlen) {
    dv4_config c;
    st_set *s = NULL;
    int rc = cfg_load(dir, &c, err, errlen);
    if (!rc) rc = st_open(dir, &s, err, errlen);
    if (!rc) rc = ck_validate(&c, s, err, errlen);
    if (!rc) {
        *fp = ck_fingerprint(&c, s);
        *bytes = st_total_bytes(s);
    }
    if (s) st_close(s);
    return rc;
}

int main(int argc, char **argv) {
    rpcsrv_config cfg = {0};
    cfg.listen = "127.0.0.1:7100";
    cfg.rank = -1;
    cfg.world = 0;
    cfg.backend = "cpu";
    cfg.gpu_mem_fraction = 0.9;
    cfg.max_seqs = 16;
    cfg.max_seq_len = 4096;
    cfg.hello_timeout_ms = 10000;
    cfg.comm_timeout_ms = 120000;
    cfg.kv_memory_mb = 1024;
    cfg.device_sampling = -1;
    const char *token_file = NULL, *peers = NULL;
    enum { O_RANK = 256, O_WORLD, O_MODEL, O_TOKEN, O_LISTEN, O_BACKEND, O_DEVICE, O_GPU_MEM, O_PEERS, O_THREADS,
           O_SEQS, O_LEN, O_HELLO_TO, O_COMM_TO, O_KV_MB, O_KV_DTYPE, O_DEV_SAMPLE };
    static const struct option opts[] = {
        {"rank", required_argument, 0, O_RANK},
        {"world-size", required_argument, 0, O_WORLD},
        {"model", required_argument, 0, O_MODEL},
        {"auth-token-file", required_argument, 0, O_TOKEN},
        {"listen", required_argument, 0, O_LISTEN},
        {"backend", required_argument, 0, O_BACKEND},
        {"device", required_argument, 0, O_DEVICE},
        {"gpu-memory-utilization", required_argument, 0, O_GPU_MEM},
        {"peers", required_argument, 0, O_PEERS},
        {"threads", required_argument, 0, O_THREADS},
        {"max-seqs", required_argument, 0, O_SEQS},
        {"max-seq-len", required_argument, 0, O_LEN},
        {"hello-timeout-ms", required_argument, 0, O_HELLO_TO},
        {"comm-timeout-ms", required_argument, 0, O_COMM_TO},
        {"kv-memory-mb", required_argument, 0, O_KV_MB},
        {"kv-dtype", required_argument, 0, O_KV_DTYPE},
        {"device-sampling", required_argument, 0, O_DEV_SAMPLE},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int o, bad = 0;
    while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (o) {
        case O_RANK: bad |= int_flag("rank", optarg, 0, 4095, &cfg.rank); break;
        case O_WORLD: bad |= int_flag("world-size", optarg, 1, 4096, &cfg.world); break;
        case O_MODEL: cfg.model_dir = optarg; break;
        case O_TOKEN: token_file = optarg; break;
        case O_LISTEN: cfg.listen = optarg; break;
        case O_BACKEND: cfg.backend = optarg; break;
        case O_DEVICE: cfg.device = atoi(optarg); break;
        case O_GPU_MEM: cfg.gpu_mem_fraction = atof(optarg); break;
        case O_PEERS: peers = optarg; break;
        case O_THREADS: bad |= int_flag("threads", optarg, 0, 4096, &cfg.threads); break;
        case O_SEQS: bad |= int_flag("max-seqs", optarg, 1, 65536, &cfg.max_seqs); break;
        case O_LEN: bad |= int_flag("max-seq-len", optarg, 1, 1 << 24, &cfg.max_seq_len); break;
        case O_HELLO_TO:
            bad |= int_flag("hello-timeout-ms", optarg, 1, 3600000, &cfg.hello_timeout_ms);
            break;
        case O_COMM_TO:
            bad |= int_flag("comm-timeout-ms", optarg, 1, 86400000, &cfg.comm_timeout_ms);
            break;
        case O_KV_MB: bad |= int_flag("kv-memory-mb", optarg, 1, 1 << 24, &cfg.kv_memory_mb); break;
        case O_KV_DTYPE: bad |= kv_dtype_flag(optarg, &cfg.kv_dtype); break;
        case O_DEV_SAMPLE: bad |= device_sampling_flag(optarg, &cfg.device_sampling); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (bad) return 2;
    if (optind < argc) {
        fprintf(stderr, "duet-worker: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (cfg.rank < 0 || cfg.world <= 0 || !cfg.model_dir || !token_file) {
        fprintf(stderr, "duet-worker: --rank, --world-size, --model and --auth-token-file are "
                        "required\n");
        usage(stderr);
        return 2;
    }
    if (cfg.rank >= cfg.world) {
        fprintf(stderr, "duet-worker: --rank %d must be below --world-size %d\n", cfg.rank,
                cfg.world);
        return 2;
    }
#ifdef DUET_HAVE_CUDA
    int backend_ok = !strcmp(cfg.backend, "cpu") || !strcmp(cfg.backend, "cuda");
    const char *backends = "cpu or cuda";
#else
    int backend_ok = !strcmp(cfg.backend, "cpu");
    const char *backends = "cpu (this build has no CUDA: nvcc was not found at configure time)";
#endif
    if (!backend_ok) {
        fprintf(stderr, "duet-worker: --backend %s is not available; use %s\n", cfg.backend,
                backends);
        return 2;
    }
    if (cfg.gpu_mem_fraction <= 0 || cfg.gpu_mem_fraction > 1) {
        fprintf(stderr, "duet-worker: --gpu-memory-utilization %g must be in (0, 1]\n",
                cfg.gpu_mem_fraction);
        return 2;
    }
    char **peer_v = NULL;
    if (cfg.world > 1) {
        int n = 0;
        if (!peers) {
            fprintf(stderr, "duet-worker: --world-size %d needs --peers with one data-plane "
                            "HOST:PORT per rank\n", cfg.world);
            return 2;
        }
        peer_v = split_peers(peers, &n);
        if (n != cfg.world) {
            fprintf(stderr, "duet-worker: --peers lists %d addresses but --world-size is %d; give "
                            "one HOST:PORT per rank, in rank order\n", n, cfg.world);
            free_peers(peer_v);
            return 2;
        }
        cfg.peers = (const char *const *)peer_v;
    }

    char err[1024], token[512];
    int rc = rpc_read_token_file(token_file, token, sizeof token, err, sizeof err);
    if (!rc) rc = checkpoint_identity(cfg.model_dir, &cfg.fingerprint, &cfg.ckpt_bytes, err,
                                      sizeof err);
    if (rc) {
        rpcsrv_log(cfg.rank, "cannot start: %s", err);
        free_peers(peer_v);
        return 1;
    }
    cfg.token = token;
    signal(SIGPIPE, SIG_IGN);
    rc = rpcsrv_run(&cfg, err, sizeof err);
    if (rc) rpcsrv_log(cfg.rank, "cannot start: %s", err);
    memset(token, 0, sizeof token);
    free_peers(peer_v);
    return rc ? 1 : 0;
}
