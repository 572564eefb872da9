//! The run's processor store (the settings in force, the counters, the captions): opened
//! on first use; a failed write is logged the first time only.
const vh = @import("vh");

var store: ?vh.datastore.Store = null;
var failed_logged = false;

/// The run's processor store (created on first use).
pub fn get() vh.datastore.Store {
    if (store == null) store = vh.datastore.Store.init();
    return store.?;
}

/// A processor-store write failed: logged the first time only.
pub fn failed(err: vh.datastore.Error) void {
    if (failed_logged) return;
    failed_logged = true;
    // (a switch, not @errorName, which would link the names of every error in std)
    const why: []const u8 = switch (err) {
        error.NoSuchFrame => "no such frame",
        error.NoSuchKey => "no such key",
        error.RuntimeError => "runtime error",
    };
    vh.log.warnf("could not write to the processor store: {s}", .{why});
}
