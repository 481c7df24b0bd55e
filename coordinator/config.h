/* config.h — duet-coordinator's configuration: defaults, the JSON config file (--config),
 * flags, and what a reload may change (server-api §11, §12; docs/config.md lists every key).
 *
 * Why: the same settings come from three places (built-in defaults, a JSON file, command-line
 * flags) and a reload must tell apart what it can apply at once from what needs a restart. One
 * table of keys (name, type, range, reloadable) drives parsing, error messages and the reload
 * diff, so a key cannot be parsed one way and compared another. The coordinator turns a
 * duet_config into http_cfg / sched_cfg / pool_cfg; this module knows none of them.
 *
 * Rules: an unknown key or a value of the wrong type or range is an error naming the key (at
 * start-up the process exits with it; on reload nothing is applied). null equals absent. Flags
 * are given as a JSON object of the same keys and win over the file, also on reload.
 */
#ifndef DUET_COORD_CONFIG_H
#define DUET_COORD_CONFIG_H

#include <stddef.h>

#include <jansson.h>

typedef struct {
    char **v;
    size_t n;
} ccfg_strs;

enum { CFG_REASONING_CONTENT = 0, CFG_REASONING = 1, CFG_REASONING_BOTH = 2 };
enum { CFG_TOOL_STREAM_INCREMENTAL = 0, CFG_TOOL_STREAM_BUFFERED = 1 };

typedef struct {
    /* restart-only */
    char *listen, *admin_socket, *tokenizer, *served_model_name, *auth_token_file,
        *model_fingerprint;
    ccfg_strs workers;
    double max_model_len, max_num_seqs, block_size, step_timeout_s, heartbeat_timeout_s,
        connect_timeout_s, load_timeout_s, vocab_size;
    int metrics_vllm_names, fold_prompt_ids;
    /* reloadable */
    char *api_key_file;
    ccfg_strs api_keys, model_aliases, cors_origins;
    double max_body_bytes, max_waiting, max_num_batched_tokens, max_n;
    double default_max_tokens_chat, default_max_tokens_cmpl;
    double default_temperature, default_top_p, default_min_p;
    int default_thinking;
    double default_thinking_budget; /* -1 = none */
    int reasoning_field, tool_stream; /* CFG_REASONING_*, CFG_TOOL_STREAM_* */
    int accept_any_model, strict_request_fields, metrics_require_auth;
    double sse_keepalive_s, stall_timeout_s, worker_recover_timeout_s,
        health_generate_timeout_s, drain_grace_s;
} duet_config;

/* The built-in defaults. */
void ccfg_init(duet_config *c);
void ccfg_free(duet_config *c);
/* Applies the keys of obj (a JSON object) over c. origin names the source in errors ("config
 * file /etc/duet.json", "flags"). 0, or -1 with err = a sentence naming the key (c may then be
 * partly changed: callers work on a scratch copy, as ccfg_load does). */
int ccfg_apply(duet_config *c, json_t *obj, const char *origin, char *err, size_t errlen);
/* Reads the JSON file (must hold one object). 0, or -1 with err. */
int ccfg_read_file(const char *path, json_t **out, char *err, size_t errlen);
/* defaults, then the file (path may be NULL), then flags (may be NULL). On failure *out is
 * left empty (ccfg_free-able) and err names the key. */
int ccfg_load(duet_config *out, const char *path, json_t *flags, char *err, size_t errlen);
/* Reload: appends to applied the names of the reloadable keys whose value differs between old
 * and neu, to restart the restart-only ones, and copies the restart-only values of old into
 * neu (they keep running until a restart). */
void ccfg_diff(const duet_config *old, duet_config *neu, json_t *applied, json_t *restart);

#endif
