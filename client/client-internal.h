/* SPDX-License-Identifier: MIT */
/*
 * libagentbroker internals shared with the PAM module and the tests, which
 * link libagentbroker.a. Not part of the public API: not in agentbroker.h,
 * and libagentbroker.map keeps these symbols local to libagentbroker.so.
 */
#ifndef AB_CLIENT_INTERNAL_H
#define AB_CLIENT_INTERNAL_H

#include <stddef.h>
#include <jansson.h>
#include "agentbroker.h"

/*
 * The varlink call {"method": method, "parameters": {"token": token, ...}}
 * and its NUL, written into buf[0..max) (*ret_len counts the NUL). The
 * token never passes through jansson (whose copies are freed unwiped): it
 * is copied as is, so it must be 1 to AB_JWT_MAX bytes of [A-Za-z0-9_.-]
 * (a compact JWS needs no escaping). token NULL: no "token" parameter.
 * params (NULL: none) holds the other, non-secret parameters, an object
 * without a "token" key. On failure buf may hold part of the message.
 * Returns 0, AB_ERR_INVALID (method not a qualified name, empty token or
 * one with another character, params not such an object or not
 * serialisable), AB_ERR_TOO_LARGE (token over AB_JWT_MAX, or the message
 * and its NUL over max bytes or its text over AB_MAX_MESSAGE).
 */
int ab_encode_token_call(const char *method, const char *token, const json_t *params, char *buf, size_t max,
                         size_t *ret_len);

/*
 * Call method with the parameters as ab_encode_token_call() writes them,
 * the message built in a buffer of the library's that is wiped before it
 * is freed. params is not stolen. On success *ret_params is the reply's
 * parameters (a new reference). Returns as ab_encode_token_call() and
 * ab_client_call().
 */
int ab_client_call_token(ab_client *c, const char *method, const char *token, const json_t *params,
                         json_t **ret_params);

/*
 * The parameters object of the error reply that ab_client_error_name()
 * names (e.g. PolicyRejected's "reason" and "findings"), borrowed: valid
 * until the next call on c or ab_client_free(). NULL when that names no
 * error reply (the call succeeded, or the transport failed), or c is NULL.
 */
const json_t *ab_client_error_parameters(const ab_client *c);

#endif
