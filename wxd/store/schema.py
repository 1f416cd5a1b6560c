"""The database schema as an ordered list of migrations; version = PRAGMA user_version.

Pure data, read by db.py. Migration N takes a database at version N-1 to version N. Never edit a
released migration; append a new one.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: everything wxd stores.
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );

    -- One row per app ('oa' | 'mp'): the central access_token.
    CREATE TABLE tokens (
        app TEXT PRIMARY KEY,
        appid TEXT NOT NULL,
        access_token TEXT NOT NULL,
        expires_at REAL NOT NULL,
        fetched_at REAL NOT NULL
    );
    -- Upstream token fetches per app per UTC day, for the daily budget.
    CREATE TABLE token_fetches (
        app TEXT NOT NULL,
        day TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (app, day)
    );

    -- Webhook inbox: every accepted message/event, deduplicated by WeChat's keys (messages.py
    -- Message.dedupe_key: MsgId, or FromUserName + CreateTime + Event (+ EventKey)). `message` is
    -- messages.message_to_json; times are unix seconds.
    CREATE TABLE inbox (
        id INTEGER PRIMARY KEY,
        dedupe_key TEXT NOT NULL UNIQUE,
        msg_type TEXT NOT NULL,
        event TEXT,
        from_user TEXT NOT NULL,
        create_time INTEGER NOT NULL,
        message TEXT NOT NULL,
        received_at REAL NOT NULL
    );

    -- Durable background jobs (event handling). Payload is opaque JSON to storage.
    -- state: queued (due at not_before) | leased (until leased_until) | done | failed.
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'queued'
            CHECK (state IN ('queued', 'leased', 'done', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        not_before REAL NOT NULL,
        leased_until REAL,
        last_error TEXT,
        created_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE INDEX jobs_due ON jobs (not_before) WHERE state = 'queued';
    CREATE INDEX jobs_leased ON jobs (leased_until) WHERE state = 'leased';

    -- OA followers (one row per OA openid ever seen; followers.py). unionid is never erased
    -- (WeChat drops it after an unfollow). event_at = CreateTime of the latest applied
    -- subscribe/unsubscribe ("events win" over older user/info data); synced_run/synced_at =
    -- the backfill run and time of the latest user/info observation.
    CREATE TABLE followers (
        oa_openid TEXT PRIMARY KEY,
        unionid TEXT,
        subscribed INTEGER NOT NULL DEFAULT 0,
        subscribed_at REAL,
        unsubscribed_at REAL,
        subscribe_scene TEXT,
        qr_scene INTEGER,
        qr_scene_str TEXT,
        event_key TEXT,
        ticket TEXT,
        event_at REAL,
        synced_run INTEGER,
        synced_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX followers_unionid ON followers (unionid) WHERE unionid IS NOT NULL;

    -- Mini Program users (one row per MP openid).
    CREATE TABLE mp_users (
        mp_openid TEXT PRIMARY KEY,
        unionid TEXT,
        session_key TEXT,
        session_at REAL,
        watermark_at INTEGER,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX mp_users_unionid ON mp_users (unionid) WHERE unionid IS NOT NULL;

    -- When a unionid was first seen on both sides (the link itself is the unionid join).
    CREATE TABLE links (
        unionid TEXT PRIMARY KEY,
        linked_at REAL NOT NULL
    );

    -- Template-message pushes (wxd/push_store.py). `seq` orders lists newest first and stays
    -- stable across VACUUM; `id` ("p_" + 20 url-safe chars) is public and, with an operator
    -- retry suffix, the client_msg_id. `body` is the template/send JSON without client_msg_id.
    CREATE TABLE pushes (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        idempotency_key TEXT,
        recipient TEXT NOT NULL,
        oa_openid TEXT NOT NULL,
        template_id TEXT NOT NULL,
        body TEXT NOT NULL,
        client_msg_id TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        leased_until REAL,
        last_attempt_at REAL,
        msgid TEXT,
        errcode INTEGER,
        error_code TEXT,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        sent_at REAL,
        finished_at REAL
    );
    -- Partial: most pushes carry no idempotency_key, and NULLs need no index entry.
    CREATE UNIQUE INDEX pushes_idempotency ON pushes (idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX pushes_due ON pushes (next_attempt_at, seq) WHERE status = 'queued';
    CREATE INDEX pushes_status ON pushes (status, seq);
    CREATE INDEX pushes_msgid ON pushes (msgid) WHERE msgid IS NOT NULL;

    -- TEMPLATESENDJOBFINISH reports whose msgid matched no push yet (kept for late matching:
    -- the report can arrive before the send's own answer is stored).
    CREATE TABLE delivery_reports (
        msgid TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        oa_openid TEXT NOT NULL,
        received_at REAL NOT NULL
    );

    -- The OA's templates (get_all_private_template cache); keys = JSON list of placeholders.
    CREATE TABLE templates (
        template_id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        content TEXT NOT NULL,
        keys TEXT NOT NULL,
        fetched_at REAL NOT NULL
    );

    -- Follower backfill: a single row (id = 1) with the resumable state.
    CREATE TABLE backfill (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        state TEXT NOT NULL,
        run INTEGER NOT NULL,
        cursor TEXT,
        pages_done INTEGER NOT NULL DEFAULT 0,
        followers_done INTEGER NOT NULL DEFAULT 0,
        total INTEGER,
        calls INTEGER NOT NULL DEFAULT 0,
        started_at REAL,
        updated_at REAL,
        finished_at REAL,
        paused_until REAL,
        last_error TEXT
    );
    """,
    # 2: the backfill's run-wide counters: followers seen by the run across restarts from the
    # head of the list, openids batchget refused (skipped), how often the run restarted from
    # the head (a stale cursor), when the cursor was saved, and whether the finished run's
    # listing was complete (only then were unseen followers marked unsubscribed).
    """
    ALTER TABLE backfill ADD COLUMN seen INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE backfill ADD COLUMN skipped INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE backfill ADD COLUMN restarts_from_head INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE backfill ADD COLUMN cursor_at REAL;
    ALTER TABLE backfill ADD COLUMN complete INTEGER;
    UPDATE backfill SET seen = followers_done, cursor_at = CASE WHEN cursor IS NULL THEN NULL
        ELSE updated_at END, complete = CASE WHEN state = 'done' THEN 1 END;
    """,
    # 3: what WeChat may have seen of a push's current client_msg_id, and its last answer.
    # client_msg_id_sends = POSTs made with the current client_msg_id (a lease counts one; a
    # refunded lease gives it back), client_msg_id_at = when the first of them was leased: both
    # reset when an operator retry gives the push a new client_msg_id. last_answer = WeChat's
    # JSON answer to the last attempt unless that was a plain acceptance (bounded, secrets
    # scrubbed; store/pushes.py). Rows attempted before this migration count their attempts
    # (at least one once attempted) since created_at (earlier than any send: the cautious side).
    """
    ALTER TABLE pushes ADD COLUMN client_msg_id_sends INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE pushes ADD COLUMN client_msg_id_at REAL;
    ALTER TABLE pushes ADD COLUMN last_answer TEXT;
    UPDATE pushes SET client_msg_id_sends = MAX(attempts, 1), client_msg_id_at = created_at
        WHERE last_attempt_at IS NOT NULL AND (attempts > 0 OR client_msg_id = id);
    """,
    # 4: explicit links (QR link codes, OA web authorization) and their one-time codes.
    """
    -- A link between an MP openid and an OA openid that WeChat's unionid does not provide
    -- (links.py bind/unbind are the only writers). One row per MP openid, an OA openid at most
    -- once. A unionid-derived link (mp_users.unionid = followers.unionid) needs no row and
    -- wins: a row that disagrees with one is ignored (identity.link_conflict).
    CREATE TABLE explicit_links (
        mp_openid TEXT PRIMARY KEY,
        oa_openid TEXT NOT NULL UNIQUE,
        source TEXT NOT NULL CHECK (source IN ('qrcode', 'oauth')),
        code_id TEXT,
        linked_at REAL NOT NULL
    );

    -- One-time link codes. `token`: a QR code's scene_str, or an OAuth link's start token
    -- (t); `state`: an OAuth link's state. Pending until linked_at or expires_at (unix s).
    -- `auth_code`: digest of the OAuth code that linked (a repeated callback is answered from
    -- it); `replaced`: the OA openid of an explicit link this one replaced; `refused`: why the
    -- latest attempt linked nothing (link_conflict).
    CREATE TABLE link_codes (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('qrcode', 'oauth')),
        mp_openid TEXT NOT NULL,
        token TEXT NOT NULL UNIQUE,
        state TEXT UNIQUE,
        ticket TEXT,
        qr_url TEXT,
        return_url TEXT,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        linked_at REAL,
        oa_openid TEXT,
        auth_code TEXT,
        replaced TEXT,
        refused TEXT
    );
    CREATE INDEX link_codes_expiry ON link_codes (expires_at);
    """,
    # 5: scoped API keys for the admin API (only a hash of each key is stored).
    """
    -- One row per key: `key_hash` is the hex SHA-256 of the key's text, `scopes` a JSON list;
    -- times are unix seconds (last_used_at is written at most about once a minute a key).
    CREATE TABLE api_keys (
        name TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_used_at REAL
    );
    """,
    # 6: the callback outbox (store/callbacks.py): one row per fact to report to the backend,
    # written in the transaction of the fact itself. `id` ("evt_" + 20 url-safe characters) is
    # public and stable across retries; the body sent is built from id, type, created_at,
    # subject, subject_seq and `data` (JSON object text, verbatim). status: pending (due at
    # next_attempt_at; leased while leased_until is set) | done | dead. max_age_s counts from
    # retry_since (the creation, or the operator's retry). last_answer is a short excerpt.
    """
    CREATE TABLE callbacks (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        subject TEXT NOT NULL,
        subject_seq INTEGER NOT NULL,
        data TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        leased_until REAL,
        retry_since REAL NOT NULL,
        last_attempt_at REAL,
        last_status INTEGER,
        last_error TEXT,
        last_answer TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE INDEX callbacks_due ON callbacks (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX callbacks_status ON callbacks (status, seq);

    -- The last per-subject sequence number handed out (never pruned, so `seq` only grows), kept
    -- by the trigger as each callback is written (inside the INSERT: no second statement).
    CREATE TABLE callback_subjects (
        subject TEXT PRIMARY KEY,
        seq INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TRIGGER callbacks_count_subject AFTER INSERT ON callbacks BEGIN
        INSERT INTO callback_subjects (subject, seq) VALUES (NEW.subject, NEW.subject_seq)
            ON CONFLICT (subject) DO UPDATE SET seq = MAX(seq, excluded.seq);
    END;
    """,
]

# Indexes a bulk load may drop and build again at its end (ingest.defer_unionid_index):
# Database.open runs these, so a crash mid-load never leaves the schema without them. Each must
# create what the migrations create.
REBUILT_ON_OPEN: dict[str, str] = {
    "followers_unionid": "CREATE INDEX IF NOT EXISTS followers_unionid ON followers (unionid)"
                         " WHERE unionid IS NOT NULL",
}
