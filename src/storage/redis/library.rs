//! The per-recipient steps as one Redis function library (`FUNCTION LOAD`, then one `FCALL`
//! per step). A library is defined once per server, where an `EVALSHA` would run its whole
//! script, the shared prelude (some twenty closures and tables) included, on every call.
//!
//! The library and its functions are named after a hash of their source, so engines of
//! different builds sharing one Redis each call their own code. A server that lost the
//! library (restarted without persistence, or a new master) answers "Function not found",
//! and the call loads it and runs again, as `EVALSHA` does on `NOSCRIPT`.

use std::sync::Arc;

use redis::aio::ConnectionLike;
use redis::{Cmd, FromRedisValue, RedisResult, Script, ToRedisArgs};

use crate::fnv;

/// Largest count passed to a script: Lua numbers are doubles.
pub(super) const LUA_MAX: u64 = 1 << 53;

/// The per-recipient steps (functions of one library) and the two scripts that touch only
/// storage-wide keys.
pub(super) struct Steps {
    pub append: Function,
    pub read: Function,
    pub plan: Function,
    pub mark: Function,
    pub ack: Function,
    pub purge: Function,
    pub idle: Function,
    pub stats: Function,
    pub remove: Function,
    pub presence: Function,
    pub forget: Function,
    pub reserve: Script,
    pub refile: Script,
}

impl Steps {
    pub fn new(library: &Arc<Library>) -> Self {
        Self {
            append: library.function("append"),
            read: library.function("read"),
            plan: library.function("plan"),
            mark: library.function("mark"),
            ack: library.function("ack"),
            purge: library.function("purge"),
            idle: library.function("idle"),
            stats: library.function("stats"),
            remove: library.function("remove"),
            presence: library.function("presence"),
            forget: library.function("forget"),
            reserve: Script::new(include_str!("reserve.lua")),
            refile: Script::new(include_str!("refile.lua")),
        }
    }
}

/// Each step's source, run with `KEYS` bound to the recipient's keys (see `prelude.lua`), and
/// its flags. A function without flags is refused whole while Redis is out of memory, which
/// is right for an append; the steps that read or free memory run all the same
/// (`allow-oom`), so a full Redis can still be drained (their own writes are small: the
/// metadata, delivery counts, presence marks).
const STEPS: [(&str, &str, &str); 11] = [
    ("append", include_str!("append.lua"), ""),
    ("read", include_str!("read.lua"), "'allow-oom'"),
    ("plan", include_str!("plan.lua"), "'allow-oom'"),
    ("mark", include_str!("mark.lua"), "'allow-oom'"),
    ("ack", include_str!("ack.lua"), "'allow-oom'"),
    ("purge", include_str!("purge.lua"), "'allow-oom'"),
    ("idle", include_str!("idle.lua"), "'allow-oom'"),
    ("stats", include_str!("stats.lua"), "'no-writes'"),
    ("remove", include_str!("remove.lua"), "'allow-oom'"),
    ("presence", include_str!("presence.lua"), "'allow-oom'"),
    ("forget", include_str!("forget.lua"), "'allow-oom'"),
];

/// The library's source and the prefix of its function names.
pub(super) struct Library {
    source: String,
    prefix: String,
}

impl Library {
    pub fn new() -> Arc<Self> {
        let prelude = include_str!("prelude.lua");
        let parts = STEPS
            .iter()
            .flat_map(|(step, body, flags)| [*step, *body, *flags]);
        let hash = std::iter::once(prelude)
            .chain(parts)
            .fold(fnv::OFFSET_64, |hash, text| {
                fnv::fnv1a_64(hash, text.as_bytes())
            });
        let name = format!("oq_{hash:016x}");
        let mut source = format!("#!lua name={name}\n{prelude}\n");
        for (step, body, flags) in STEPS {
            source.push_str(&format!(
                "redis.register_function{{function_name = '{name}_{step}', flags = {{{flags}}},\n\
                 callback = function(keys, ARGV)\nbind(keys)\n{body}\nend}}\n"
            ));
        }
        Arc::new(Self {
            source,
            prefix: format!("{name}_"),
        })
    }

    /// Loads the library (again) into the server, or every master of a cluster.
    pub async fn load(&self, connection: &mut impl ConnectionLike) -> RedisResult<()> {
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&self.source)
            .exec_async(connection)
            .await
    }

    /// The function running `step` (one of `STEPS`).
    pub fn function(self: &Arc<Self>, step: &str) -> Function {
        debug_assert!(STEPS.iter().any(|(name, _, _)| *name == step));
        Function {
            name: format!("{}{step}", self.prefix),
            library: Arc::clone(self),
        }
    }
}

/// One step of the library, called as a `redis::Script` is: `.key(..).arg(..).invoke_async(..)`.
pub(super) struct Function {
    name: String,
    library: Arc<Library>,
}

impl Function {
    /// A call with the recipient's keys.
    pub fn key(&self, keys: &[String]) -> Call<'_> {
        Call {
            cmd: self.command(keys),
            library: &self.library,
        }
    }

    /// The bare `FCALL` with the recipient's keys, for a pipeline (which, unlike `Call`,
    /// does not load the library when the server lacks it).
    pub fn command(&self, keys: &[String]) -> Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(&self.name).arg(keys.len()).arg(keys);
        cmd
    }
}

/// A call being built.
pub(super) struct Call<'a> {
    cmd: Cmd,
    library: &'a Library,
}

impl Call<'_> {
    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// Runs the call, loading the library first if the server does not have it.
    pub async fn invoke_async<T: FromRedisValue>(
        &self,
        connection: &mut (impl ConnectionLike + Send),
    ) -> RedisResult<T> {
        match self.cmd.query_async(connection).await {
            Err(error) if is_missing_function(&error) => {
                self.library.load(connection).await?;
                self.cmd.query_async(connection).await
            }
            result => result,
        }
    }
}

fn is_missing_function(error: &redis::RedisError) -> bool {
    error.code() == Some("ERR")
        && error
            .detail()
            .is_some_and(|d| d.contains("Function not found"))
}
