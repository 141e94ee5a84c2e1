-- fleetq_version: the version of this function library.
--
-- Reply    the version string, '<semver>+<hash of the sources>', e.g. '1.0.0+5769c1ff'. The
--          major number is the wire-protocol version; a process loads the library when the
--          server has none or one with an older semver, and leaves an equal or newer one.

local LIBRARY_VERSION = '__FLEETQ_VERSION__'

redis.register_function{ function_name = 'fleetq_version', callback = function() return LIBRARY_VERSION end,
  flags = { 'no-writes' } }
