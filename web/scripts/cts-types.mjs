// The CJS entry needs its own declaration file: in a "type": "module"
// package a .d.ts describes ES modules, so `require` users under
// moduleResolution node16 would get "masquerading as CJS" errors. The
// declarations are the same; only the extension says which module kind.
import { copyFileSync } from 'node:fs';

copyFileSync('lib/taskstream.d.ts', 'lib/taskstream.d.cts');
