// SPDX-License-Identifier: MIT
// Node 18 (Debian 12's nodejs) has WebCrypto only as node:crypto's webcrypto;
// jose and the MCP SDK look for globalThis.crypto. Import this module first.
import { webcrypto } from 'node:crypto';

if (!globalThis.crypto) globalThis.crypto = webcrypto;
