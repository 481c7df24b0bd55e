/* fuzz_encoder.c — libFuzzer harness for the prompt encoder (coordinator/chat).
 *
 * Why: the encoder reads client JSON; whatever the request holds it must either render a
 * prompt or return DUET_EINVAL with a sentence — never crash, leak or read out of bounds.
 * Input: a JSON request {"messages", "tools", "response_format", "thinking", "effort",
 * "flavour", "drop_thinking", "developer_as_system"} (loaded with jansson). Invariants checked:
 * success ⇒ the text starts with BOS and its length matches; failure ⇒ a non-empty message.
 * It must never write files.
 */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "coordinator/chat/encoder.h"

#define FZ_BOS "<｜begin▁of▁sentence｜>"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    json_t *r = json_loadb((const char *)data, size, JSON_ALLOW_NUL, NULL);
    if (!json_is_object(r)) {
        json_decref(r);
        return 0;
    }
    enc_request req;
    enc_request_init(&req);
    req.messages = json_object_get(r, "messages");
    req.tools = json_object_get(r, "tools");
    req.response_format = json_object_get(r, "response_format");
    const json_t *v;
    if ((v = json_object_get(r, "thinking"))) req.thinking = json_is_true(v);
    if ((v = json_object_get(r, "drop_thinking"))) req.drop_thinking = json_is_true(v);
    if ((v = json_object_get(r, "developer_as_system"))) req.developer_as_system = json_is_true(v);
    if ((v = json_object_get(r, "effort"))) enc_effort_parse(json_string_value(v), &req.effort);
    if ((v = json_object_get(r, "flavour")) && json_is_string(v))
        req.flavour = strcmp(json_string_value(v), "preview") ? ENC_FLAVOUR_0731
                                                              : ENC_FLAVOUR_PREVIEW;
    char *out = NULL, err[256] = "";
    size_t len = 0;
    int rc = enc_render(&req, &out, &len, err, sizeof err);
    if (rc == 0) {
        if (!out || strncmp(out, FZ_BOS, strlen(FZ_BOS)) || len < strlen(FZ_BOS)) {
            fprintf(stderr, "fuzz_encoder: success without a BOS-prefixed prompt\n");
            abort();
        }
    } else if (rc != DUET_EINVAL || !err[0] || out) {
        fprintf(stderr, "fuzz_encoder: failure rc=%d without a message ('%s')\n", rc, err);
        abort();
    }
    free(out);
    json_decref(r);
    return 0;
}
