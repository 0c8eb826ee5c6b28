//! Real Redis servers for tests: standalone, TLS, a three-master cluster, and a master
//! with a replica watched by three Sentinels. Each runs `redis-server` on free loopback
//! ports in its own temporary directory, without persistence, and is killed on drop.
//!
//! Include it with `#[path = "support/redis.rs"] #[allow(dead_code)] mod redis_harness;`
//! (each test binary uses a different part of it); it depends on nothing else under
//! `tests/support`.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use redis::FromRedisValue;

/// Ports are taken from here: below the ephemeral range, and low enough that a cluster
/// node's bus port (port + 10000) is valid too.
const PORTS: std::ops::Range<u16> = 20000..45000;
const STARTUP: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

/// Waits until `ready` holds, polling; panics with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        sleep(POLL);
    }
}

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "session-proxy-{tag}-{}-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A port that is free now, and whose bus port (+10000) is free too.
fn free_port() -> u16 {
    loop {
        let port = rand::random_range(PORTS);
        if port_is_free(port) && port_is_free(port + 10000) {
            return port;
        }
    }
}

/// What kind of process a `RedisServer` runs.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Server,
    Sentinel,
}

/// TLS material of a server started with `start_tls`.
struct Tls {
    ca: PathBuf,
}

/// One `redis-server` process (or Sentinel) on a loopback port.
pub struct RedisServer {
    port: u16,
    conf: PathBuf,
    mode: Mode,
    tls: Option<Tls>,
    child: Option<Child>,
    dir: TempDir,
}

impl RedisServer {
    /// A standalone server.
    pub fn start() -> RedisServer {
        RedisServer::spawn_new("redis", Mode::Server, "", false)
    }

    /// A standalone server that only speaks TLS, with a certificate for 127.0.0.1 signed
    /// by a fresh CA (`ca_path`).
    pub fn start_tls() -> RedisServer {
        RedisServer::spawn_new("redis-tls", Mode::Server, "", true)
    }

    /// Starts a process with `extra` configuration lines, retrying on another port if the
    /// chosen one was taken in the meantime.
    fn spawn_new(tag: &str, mode: Mode, extra: &str, tls: bool) -> RedisServer {
        for _ in 0..10 {
            let dir = TempDir::new(tag);
            let port = free_port();
            let tls = tls.then(|| make_certificates(&dir.0));
            let mut conf = String::new();
            match &tls {
                None => conf.push_str(&format!("port {port}\n")),
                Some(_) => conf.push_str(&format!(
                    "port 0\ntls-port {port}\ntls-cert-file {d}/server.pem\n\
                     tls-key-file {d}/server.key\ntls-ca-cert-file {d}/ca.pem\n\
                     tls-auth-clients no\n",
                    d = dir.0.display()
                )),
            }
            conf.push_str(&format!(
                "bind 127.0.0.1\ndir {dir}\nlogfile {dir}/redis.log\ndaemonize no\n",
                dir = dir.0.display()
            ));
            if mode == Mode::Server {
                conf.push_str("save \"\"\nappendonly no\n");
            }
            conf.push_str(extra);
            let path = dir.0.join(if mode == Mode::Sentinel {
                "sentinel.conf"
            } else {
                "redis.conf"
            });
            fs::write(&path, conf).expect("write redis config");
            let mut server = RedisServer {
                port,
                conf: path,
                mode,
                tls,
                child: None,
                dir,
            };
            if server.launch() {
                return server;
            }
        }
        panic!("could not start redis-server on a free port (is /usr/bin/redis-server installed?)");
    }

    /// Runs the process and waits until it answers; false if it exited (port taken).
    fn launch(&mut self) -> bool {
        let mut command = Command::new("redis-server");
        command.arg(&self.conf);
        if self.mode == Mode::Sentinel {
            command.arg("--sentinel");
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server");
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < STARTUP {
            if let Some(child) = &mut self.child
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            if self.answers() {
                return true;
            }
            sleep(POLL);
        }
        panic!(
            "redis-server on port {} did not come up; see {}",
            self.port,
            self.log_path().display()
        );
    }

    fn answers(&self) -> bool {
        if self.tls.is_some() {
            // The harness's own client does not speak TLS: a completed TCP handshake is
            // enough, since Redis listens only once it is ready.
            return TcpStream::connect(("127.0.0.1", self.port)).is_ok();
        }
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut conn).is_ok()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The CA that signed a TLS server's certificate (PEM).
    pub fn ca_path(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca.as_path())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.0.join("redis.log")
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process (SIGSTOP) without closing anything: its connections stay open
    /// and unanswered, as with a paused machine or a network partition.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("a running process").id();
        let status = Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Starts the process again on the same port, with an empty dataset.
    pub fn restart(&mut self) {
        self.stop();
        let start = Instant::now();
        while !self.launch() {
            assert!(start.elapsed() < STARTUP, "port {} stayed taken", self.port);
            sleep(POLL);
        }
    }

    /// `master`, `slave` or `sentinel`, as `ROLE` reports it; `None` when unreachable.
    pub fn role(&self) -> Option<String> {
        match self.try_cli::<redis::Value>(&["ROLE"]).ok()? {
            redis::Value::Array(items) => match items.first()? {
                redis::Value::BulkString(role) => String::from_utf8(role.clone()).ok(),
                _ => None,
            },
            _ => None,
        }
    }

    /// Runs one command on this server and returns its answer.
    pub fn cli<T: FromRedisValue>(&self, args: &[&str]) -> T {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("{args:?} on port {}: {e}", self.port))
    }

    pub fn try_cli<T: FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        command(args).query(&mut conn)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn command(args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd
}

/// A CA and a server certificate for IP 127.0.0.1, made with the `openssl` command.
fn make_certificates(dir: &Path) -> Tls {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=session-proxy test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("write san.ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    Tls {
        ca: dir.join("ca.pem"),
    }
}

/// A Redis Cluster of three masters, all 16384 slots assigned, with or without replicas.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Three masters, no replicas; a node is declared failed after 5 s.
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(0, 5000)
    }

    /// Three masters with `replicas` replicas each (`redis-cli --cluster create` chooses
    /// which node plays which part); a node is declared failed after `node_timeout_ms`.
    pub fn start_with(replicas: usize, node_timeout_ms: u64) -> RedisCluster {
        let config = format!(
            "cluster-enabled yes\ncluster-config-file nodes.conf\n\
             cluster-node-timeout {node_timeout_ms}\n"
        );
        let nodes: Vec<RedisServer> = (0..3 * (1 + replicas))
            .map(|_| RedisServer::spawn_new("redis-cluster", Mode::Server, &config, false))
            .collect();
        let mut args = vec!["--cluster".to_string(), "create".to_string()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())));
        args.extend(["--cluster-replicas".into(), replicas.to_string()]);
        args.push("--cluster-yes".into());
        let out = Command::new("redis-cli")
            .args(&args)
            .output()
            .expect("run redis-cli (package redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until("cluster_state:ok on every node", STARTUP, || {
            nodes.iter().all(|n| {
                n.try_cli::<String>(&["CLUSTER", "INFO"]).is_ok_and(|info| {
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                })
            })
        });
        if replicas > 0 {
            wait_until("every replica in sync", STARTUP, || {
                nodes
                    .iter()
                    .filter(|n| n.role().as_deref() == Some("slave"))
                    .all(|n| {
                        n.try_cli::<String>(&["INFO", "replication"])
                            .is_ok_and(|info| info.contains("master_link_status:up"))
                    })
            });
            // Gossip tells the other nodes who replicates whom a moment later.
            wait_until(
                "every node to list every replica as healthy",
                STARTUP,
                || {
                    nodes.iter().all(|n| {
                        n.try_cli::<String>(&["CLUSTER", "NODES"])
                            .is_ok_and(|listed| {
                                let healthy = listed.lines().filter(|line| {
                                    let fields: Vec<&str> = line.split_whitespace().collect();
                                    fields.len() >= 8
                                        && fields[2].split(',').any(|f| f == "slave")
                                        && !fields[2].contains("fail")
                                        && !fields[2].contains("handshake")
                                        && fields[7] == "connected"
                                });
                                healthy.count() == 3 * replicas
                            })
                    })
                },
            );
        }
        RedisCluster { nodes }
    }

    /// The replica of the master at `master` (an index into `nodes`).
    pub fn replica_of(&self, master: usize) -> usize {
        let port = format!("master_port:{}", self.nodes[master].port());
        self.nodes
            .iter()
            .position(|n| {
                n.try_cli::<String>(&["INFO", "replication"])
                    .is_ok_and(|info| info.lines().any(|l| l.trim() == port))
            })
            .expect("the master has a replica")
    }

    /// The node serving `key` as its master: the one that answers for it without a
    /// redirection.
    pub fn master_of(&self, key: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.try_cli::<i64>(&["EXISTS", key]).is_ok())
            .expect("a node serves the key")
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The nodes, to stop and restart them. A restarted node keeps its cluster identity
    /// and slots (its `nodes.conf` stays), but none of its keys.
    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Runs one command through a cluster client, which sends it to the node owning the key.
    pub fn cli<T: FromRedisValue>(&self, args: &[&str]) -> T {
        let client = redis::cluster::ClusterClient::new(self.urls()).expect("cluster client");
        let mut conn = client.get_connection().expect("cluster connection");
        command(args)
            .query(&mut conn)
            .unwrap_or_else(|e| panic!("{args:?} on the cluster: {e}"))
    }
}

/// The name the Sentinels give the monitored master.
pub const SENTINEL_MASTER: &str = "mymaster";

/// A master, its replicas, and three Sentinels (quorum 2) watching them.
pub struct RedisSentinel {
    data: Vec<RedisServer>,
    sentinels: Vec<RedisServer>,
}

impl RedisSentinel {
    /// A master with one replica.
    pub fn start() -> RedisSentinel {
        RedisSentinel::start_with(1)
    }

    pub fn start_with(replicas: usize) -> RedisSentinel {
        let master = RedisServer::start();
        let mut data = vec![master];
        for _ in 0..replicas {
            let replica = RedisServer::spawn_new(
                "redis-replica",
                Mode::Server,
                &format!("replicaof 127.0.0.1 {}\n", data[0].port()),
                false,
            );
            wait_until("the replica to sync with the master", STARTUP, || {
                replica
                    .try_cli::<String>(&["INFO", "replication"])
                    .is_ok_and(|info| info.contains("master_link_status:up"))
            });
            data.push(replica);
        }
        let master = &data[0];
        let config = format!(
            "sentinel resolve-hostnames no\n\
             sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {} 2\n\
             sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
             sentinel failover-timeout {SENTINEL_MASTER} 5000\n",
            master.port()
        );
        let sentinels: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::spawn_new("redis-sentinel", Mode::Sentinel, &config, false))
            .collect();
        let setup = RedisSentinel { data, sentinels };
        let replica_ports: Vec<String> = setup.data[1..]
            .iter()
            .map(|r| r.port().to_string())
            .collect();
        wait_until(
            "every Sentinel to know the replicas and the other Sentinels",
            STARTUP,
            || {
                setup.sentinels.iter().all(|s| {
                    let knows_replica = s
                        .try_cli::<Vec<Vec<String>>>(&["SENTINEL", "REPLICAS", SENTINEL_MASTER])
                        .is_ok_and(|replicas| {
                            replica_ports.iter().all(|port| {
                                replicas.iter().any(|r| {
                                    field(r, "port") == Some(port.as_str())
                                        && field(r, "flags") == Some("slave")
                                        && field(r, "master-link-status") == Some("ok")
                                })
                            })
                        });
                    let knows_sentinels = s
                        .try_cli::<Vec<Vec<String>>>(&["SENTINEL", "SENTINELS", SENTINEL_MASTER])
                        .is_ok_and(|others| others.len() == 2);
                    knows_replica && knows_sentinels
                })
            },
        );
        setup
    }

    /// `redis://127.0.0.1:PORT` of each Sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    pub fn sentinels(&self) -> &[RedisServer] {
        &self.sentinels
    }

    /// The port of the master as the first Sentinel reports it.
    pub fn master_port(&self) -> u16 {
        let (_, port): (String, String) =
            self.sentinels[0].cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER]);
        port.parse().expect("master port")
    }

    /// The data server (master or replica) listening on `port`.
    pub fn server(&self, port: u16) -> &RedisServer {
        self.data
            .iter()
            .find(|s| s.port() == port)
            .unwrap_or_else(|| panic!("no data server on port {port}"))
    }

    /// The current master.
    pub fn master(&self) -> &RedisServer {
        self.server(self.master_port())
    }

    /// Forces a failover through the first Sentinel and waits until every Sentinel names
    /// the promoted replica as the master, which then accepts writes. Returns its port.
    pub fn failover(&self) -> u16 {
        let old = self.master_port();
        wait_until("the Sentinel to accept SENTINEL FAILOVER", STARTUP, || {
            // NOGOODSLAVE or INPROG: the Sentinel is not ready yet; ask again.
            self.sentinels[0]
                .try_cli::<String>(&["SENTINEL", "FAILOVER", SENTINEL_MASTER])
                .is_ok()
        });
        self.wait_for_new_master(old)
    }

    /// Kills the master (SIGKILL) and waits until the Sentinels have promoted the replica,
    /// which is left without a replica of its own. Returns its port.
    pub fn crash_master(&mut self) -> u16 {
        let old = self.master_port();
        if let Some(master) = self.data.iter_mut().find(|s| s.port() == old) {
            master.stop();
        }
        self.wait_for_new_master(old)
    }

    /// Kills (SIGKILL) the last `count` Sentinels (the first one keeps answering
    /// `master_port`).
    pub fn crash_sentinels(&mut self, count: usize) {
        for sentinel in self.sentinels.iter_mut().rev().take(count) {
            sentinel.stop();
        }
    }

    /// Kills (SIGKILL) every server but the master.
    pub fn crash_replicas(&mut self) {
        let master = self.master_port();
        for replica in self.data.iter_mut().filter(|s| s.port() != master) {
            replica.stop();
        }
    }

    /// Waits until every Sentinel names a master other than `old`, and that server acts as
    /// master. Returns its port.
    fn wait_for_new_master(&self, old: u16) -> u16 {
        let mut new = old;
        wait_until("every Sentinel to report the new master", STARTUP, || {
            let ports: Vec<Option<u16>> = self
                .sentinels
                .iter()
                .map(|s| {
                    s.try_cli::<(String, String)>(&[
                        "SENTINEL",
                        "GET-MASTER-ADDR-BY-NAME",
                        SENTINEL_MASTER,
                    ])
                    .ok()
                    .and_then(|(_, port)| port.parse().ok())
                })
                .collect();
            match ports[0] {
                Some(port) if port != old && ports.iter().all(|p| *p == Some(port)) => {
                    new = port;
                    true
                }
                _ => false,
            }
        });
        wait_until("the promoted replica to act as master", STARTUP, || {
            self.server(new).role().as_deref() == Some("master")
        });
        new
    }
}

/// A field of a Sentinel's flat `[name, value, name, value, …]` answer.
fn field<'a>(flat: &'a [String], name: &str) -> Option<&'a str> {
    flat.chunks(2)
        .find(|pair| pair[0] == name)
        .and_then(|pair| pair.get(1))
        .map(String::as_str)
}
